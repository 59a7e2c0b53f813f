// The searches page: start a search from the form; keep the table live while searches are queued or running.
"use strict";

(() => {
  const form = document.getElementById("search-form");

  // "4" is a number in internal units, "64KiB" a string with a unit: the API reads both.
  const numberOrText = (text) => (text.trim() !== "" && !Number.isNaN(Number(text)) ? Number(text) : text.trim());
  const optionalInt = (text) => (text.trim() === "" ? null : numberOrText(text));

  function requestBody() {
    const f = form.elements;
    const body = {
      model: f.model.value,
      data: f.data.value === "" ? null : f.data.value,
      budgets: f.budget_value.value.trim() === "" ? [] : [{ metric: f.budget_metric.value, value: numberOrText(f.budget_value.value) }],
      options: { weight_bits: f.weight_bits.value.split(/[\s,]+/).filter(Boolean).map(numberOrText) },
      sensitivity: { method: f.method.value },
      solver: { name: f.solver.value },
      pareto_points: optionalInt(f.pareto_points.value),
      calib_size: optionalInt(f.calib_size.value),
    };
    const limit = optionalInt(f.eval_limit.value);
    if (limit !== null) body.eval_limit = limit;
    if (body.pareto_points === null) delete body.pareto_points;
    if (body.calib_size === null) delete body.calib_size;
    return body;
  }

  Dash.onSubmit(form, async () => {
    const result = await Dash.send("POST", "/ui/api/search", requestBody());
    if (result.ok) window.location.assign(result.body.page);
    else Dash.showErrors(form, result);
  });

  const offset = new URLSearchParams(window.location.search).get("offset") || "0";
  Dash.pollWhile(async () => {
    if (document.getElementById("search-rows").dataset.active !== "1") return false;
    const html = await Dash.fetchFragment(`/ui/searches/rows?offset=${encodeURIComponent(offset)}`);
    if (html) Dash.swapFragments(html);
    return true;
  });
})();
