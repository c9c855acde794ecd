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
// A live task's page follows its event stream: <section data-stream="…" data-run="N">. The
// first connection replays the current run from its start, so the run's log lines and streamed
// output are rebuilt from it (a reconnect resumes after the last event, so nothing is cleared
// then); while it is open the section's poll is skipped. When it ends with task.finished the
// section is fetched once more (the result, the callback); if the stream cannot be opened or
// fails, the poll takes over again.
const UNAVAILABLE = "(live updates unavailable: refreshing every 2 s)";
const liveStream = { source: null, url: null, failed: null };
function followTaskStream() {
  const section = document.querySelector("[data-stream]");
  const url = section ? section.dataset.stream : null;
  const byId = (id) => document.getElementById(id);
  const state = (text) => { const el = byId("task-stream-state"); if (el) el.textContent = text; };
  if (liveStream.url === url) return;
  if (liveStream.source) liveStream.source.close();
  liveStream.source = null;
  liveStream.url = url;
  // Each render carries a fresh token; a stream that failed is not retried on every poll (the
  // poll's swap rendered the note afresh: say it again).
  if (url && liveStream.failed === url.split("?")[0]) { state(UNAVAILABLE); return; }
  if (!url || !window.EventSource) return;
  const run = section.dataset.run;
  const clock = new Intl.DateTimeFormat([], {
    timeZone: section.dataset.timeZone || "UTC", hour: "2-digit", minute: "2-digit",
    second: "2-digit", fractionalSecondDigits: 3, hourCycle: "h23", timeZoneName: "short",
  });
  const source = new EventSource(url);
  liveStream.source = source;
  let replayed = false;
  source.addEventListener("open", () => {
    if (!replayed) {
      replayed = true;
      const streamed = byId("task-streamed");
      if (streamed) streamed.textContent = "";
      document.querySelectorAll(`#task-log [data-run="${run}"]`).forEach((line) => line.remove());
    }
    state("live");
  });
  const data = (event) => JSON.parse(event.data);
  source.addEventListener("task.started", () => {
    const badge = byId("task-status");
    if (badge) { badge.textContent = "running"; badge.className = "badge big running"; }
  });
  source.addEventListener("task.progress", (event) => {
    const { progress, message } = data(event);
    const bar = byId("task-progress");
    if (bar) bar.value = progress;
    const text = byId("task-progress-text");
    if (text) text.textContent = `${progress}%`;
    const note = byId("task-progress-message");
    if (note && message) note.textContent = message;
  });
  source.addEventListener("task.log", (event) => {
    const { level, message, at } = data(event);
    const log = byId("task-log");
    if (!log) return;
    const line = document.createElement("span");
    line.dataset.run = run;
    const time = clock.format(new Date(at));
    line.textContent = `${time} [${level}] (run ${run}) ${message}\n`;
    log.append(line);
  });
  source.addEventListener("task.output.delta", (event) => {
    const streamed = byId("task-streamed");
    if (streamed) streamed.textContent += data(event).text;
  });
  source.addEventListener("task.finished", () => {
    source.close();
    liveStream.source = null;
    state("");
    const live = byId("task-live");
    if (live && live.getAttribute("hx-get")) htmx.ajax("GET", live.getAttribute("hx-get"), { source: live, target: live, swap: "outerHTML" });
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      liveStream.source = null;
      liveStream.failed = url.split("?")[0];
      state(UNAVAILABLE);
    } else {
      state("reconnecting…");
    }
  });
}
document.addEventListener("DOMContentLoaded", followTaskStream);
document.addEventListener("htmx:afterSettle", followTaskStream);
document.addEventListener("htmx:beforeRequest", (event) => {
  const elt = event.detail.elt;
  if (elt.id === "task-live" && liveStream.source && event.detail.requestConfig.verb === "get" && elt.hasAttribute("data-poll")) event.preventDefault();
});
