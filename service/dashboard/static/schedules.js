// The schedules page: create a schedule (its request as JSON), show the API's reasons next to the fields.
"use strict";

(() => {
  const form = document.getElementById("schedule-form");
  Dash.onSubmit(form, async () => {
    const f = form.elements;
    let spec;
    try {
      spec = JSON.parse(f.spec.value);
    } catch (err) {
      Dash.showErrors(form, { status: 422, body: { detail: [{ loc: ["spec"], msg: `not valid JSON: ${err.message}` }] } });
      return;
    }
    const body = { name: f.name.value, cron: f.cron.value, kind: f.kind.value, spec, enabled: f.enabled.checked };
    const result = await Dash.send("POST", "/ui/api/schedules", body);
    if (result.ok) window.location.reload();
    else Dash.showErrors(form, result);
  });
  Dash.wireDeletes();
})();
