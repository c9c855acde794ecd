// Dashboard behaviour without inline scripts (the pages run under a strict CSP).
// Polling elements carry data-poll: they skip their requests while the tab is hidden and
// refresh at once when it is shown again. hx-sync="this:drop" keeps polls from stacking.
// A list marked data-poll-unless-checked also skips its refresh while rows are checked, so a
// refresh never drops the operator's selection.
document.addEventListener("htmx:beforeRequest", (event) => {
  const elt = event.detail.elt;
  if (!elt.hasAttribute("data-poll") || event.detail.requestConfig.verb !== "get") return;
  if (document.hidden) event.preventDefault();
  // A poll must not swap away the button a confirmation dialog is holding.
  else if (document.getElementById("confirm-dialog")?.open) event.preventDefault();
  else if (elt.hasAttribute("data-poll-unless-checked") && elt.querySelector("input[type=checkbox]:checked")) event.preventDefault();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) document.body.dispatchEvent(new Event("visible-again"));
});
// "Select all" checkboxes: <input type=checkbox data-select-all="name" form="form-id"> checks
// or clears the form's checkboxes of that name. form.elements also holds the controls outside
// the <form> element that join it with form="form-id" (the task rows' checkboxes do).
document.addEventListener("change", (event) => {
  const name = event.target.dataset && event.target.dataset.selectAll;
  const form = event.target.form;
  if (!name || !form) return;
  for (const box of form.elements) {
    if (box.type === "checkbox" && box.name === name) box.checked = event.target.checked;
  }
});
// Confirmation for dangerous buttons, <button data-confirm="…">, in an in-page <dialog> (no
// window.confirm, no navigation). The click is held; on Confirm the button is clicked again
// with the confirmation marked, so htmx and plain forms both go on as they would have.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-confirm]");
  if (!button) return;
  if (button.dataset.confirmed === "yes") {
    delete button.dataset.confirmed;
    return;
  }
  event.preventDefault();
  event.stopImmediatePropagation();
  const dialog = document.getElementById("confirm-dialog");
  if (!dialog || !dialog.showModal) {
    if (window.confirm(button.dataset.confirm)) { button.dataset.confirmed = "yes"; button.click(); }
    return;
  }
  document.getElementById("confirm-text").textContent = button.dataset.confirm;
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "ok") { button.dataset.confirmed = "yes"; button.click(); }
  }, { once: true });
  dialog.returnValue = "";
  dialog.showModal();
}, true);
