// Helpers shared by the dashboard's pages: calls to /ui/api with the CSRF token, the API's validation
// messages placed next to the fields they name, polling of server-rendered fragments.
"use strict";

window.Dash = (() => {
  const csrfToken = () => document.querySelector('meta[name="csrf-token"]').content;

  // A JSON (object) or multipart (FormData) request; resolves to {ok, status, body}.
  async function send(method, url, body) {
    const headers = { "X-CSRF-Token": csrfToken(), Accept: "application/json" };
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
    } catch (err) {
      return { ok: false, status: 0, body: { detail: `the service did not answer (${err.message})` } };
    }
    let json = null;
    try {
      json = await response.json();
    } catch (_) {
      json = { detail: `${response.status} ${response.statusText}` };
    }
    if (response.status === 401) window.location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search));
    return { ok: response.ok, status: response.status, body: json };
  }

  function clearErrors(form) {
    form.querySelectorAll(".field-error").forEach((el) => el.remove());
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
    const top = form.querySelector(".form-error");
    if (top) {
      top.hidden = true;
      top.textContent = "";
    }
  }

  function markField(field, message) {
    const el = document.createElement("div");
    el.className = "field-error";
    el.setAttribute("role", "alert");
    el.textContent = message;
    field.appendChild(el);
    const input = field.querySelector("input, select, textarea");
    if (input) input.setAttribute("aria-invalid", "true");
  }

  function formLevel(form, message) {
    const top = form.querySelector(".form-error");
    if (!top) return;
    top.hidden = false;
    top.textContent = top.textContent ? `${top.textContent}\n${message}` : message;
  }

  // The field a pydantic error's `loc` names: its own field, a field that declares it (data-loc-also),
  // the field it lies inside, or, among the fields under it, the one its message names.
  function fieldFor(form, loc, message) {
    const key = loc.filter((part) => part !== "body").join(".");
    const fields = [...form.querySelectorAll("[data-loc]")];
    const exact = fields.find(
      (f) => f.dataset.loc === key || (f.dataset.locAlso || "").split(" ").includes(key),
    );
    if (exact) return exact;
    const containing = fields
      .filter((f) => key.startsWith(f.dataset.loc + "."))
      .sort((a, b) => b.dataset.loc.length - a.dataset.loc.length);
    if (containing.length) return containing[0];
    if (!key) return null;
    const under = fields.filter((f) => f.dataset.loc.startsWith(key + "."));
    if (under.length === 1) return under[0];
    return (
      under.find((f) => {
        const name = f.dataset.loc.split(".").pop();
        return new RegExp(`\\b${name}\\b`).test(message);
      }) || null
    );
  }

  // Show a 4xx answer's `detail`: each pydantic error next to its field; a text detail next to the field whose
  // data-string-errors pattern it matches (an empty pattern takes any text), else at the top of the form.
  function showErrors(form, result) {
    clearErrors(form);
    const detail = result.body && result.body.detail !== undefined ? result.body.detail : `error ${result.status}`;
    if (Array.isArray(detail)) {
      for (const err of detail) {
        const message = err.msg || JSON.stringify(err);
        const field = fieldFor(form, err.loc || [], message);
        if (field) markField(field, message);
        else formLevel(form, message);
      }
      return;
    }
    const message = typeof detail === "string" ? detail : JSON.stringify(detail);
    const target = [...form.querySelectorAll("[data-string-errors]")].find((f) => {
      const pattern = f.dataset.stringErrors;
      return !pattern || new RegExp(pattern, "i").test(message);
    });
    if (target) markField(target, message);
    else formLevel(form, message);
  }

  // Replace the elements of the page that a server-rendered fragment carries (matched by id).
  function swapFragments(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    for (const fresh of [...tpl.content.children]) { // a copy: replaceWith moves each out of the template
      const old = fresh.id && document.getElementById(fresh.id);
      if (old) old.replaceWith(fresh);
    }
  }

  async function fetchFragment(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
    if (response.redirected && new URL(response.url).pathname === "/ui/login") {
      // the session ended: log in again, then come back to this page (not to the fragment)
      window.location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search));
      return null;
    }
    if (!response.ok) return null;
    return response.text();
  }

  // Run `step` every `ms` while it resolves true (a page stops polling once nothing it shows is running).
  function pollWhile(step, ms = 2000) {
    const tick = async () => {
      let again = true;
      try {
        again = await step();
      } catch (_) {
        again = true; // a blip of the service: try again at the next tick
      }
      if (again) setTimeout(tick, ms);
    };
    setTimeout(tick, ms);
  }

  function onSubmit(form, handler) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector('button[type="submit"]');
      if (button) button.disabled = true;
      clearErrors(form);
      try {
        await handler(event);
      } finally {
        if (button) button.disabled = false;
      }
    });
  }

  // Delete buttons of the list pages: confirm, DELETE, reload (or show why not).
  function wireDeletes(root = document) {
    root.querySelectorAll("button.delete[data-url]").forEach((button) => {
      button.addEventListener("click", async () => {
        if (!window.confirm(`Delete ${button.dataset.name || "this item"}?`)) return;
        const result = await send("DELETE", button.dataset.url);
        if (result.ok) window.location.reload();
        else window.alert(typeof result.body.detail === "string" ? result.body.detail : JSON.stringify(result.body.detail));
      });
    });
  }

  return { send, clearErrors, showErrors, swapFragments, fetchFragment, pollWhile, onSubmit, wireDeletes };
})();
