// The models and data sets pages: upload a file (multipart, as `POST /models` and `POST /datasets` take it),
// show the API's reason next to the field when it is refused; delete rows.
"use strict";

(() => {
  const form = document.getElementById("upload-form");
  Dash.onSubmit(form, async () => {
    const data = new FormData();
    const file = form.elements.file.files[0];
    if (!file) {
      Dash.showErrors(form, { status: 422, body: { detail: [{ loc: ["file"], msg: "choose a file to upload" }] } });
      return;
    }
    data.append("file", file, file.name);
    if (form.elements.name.value.trim()) data.append("name", form.elements.name.value.trim());
    if (form.elements.architecture && form.elements.architecture.value) data.append("architecture", form.elements.architecture.value);
    const result = await Dash.send("POST", form.dataset.url, data);
    if (result.ok) window.location.reload();
    else Dash.showErrors(form, result);
  });
  Dash.wireDeletes();
})();
