// The fam-server web page: read a document into a session, watch the ingest progress, ask questions and
// read the answers as they stream, manage sessions. Plain browser JavaScript, no dependencies.
//
// Every request goes to the server that served this page, through `api()`, which adds the API key (if one
// is saved) as a Bearer token and turns error answers into an ApiError carrying the server's error.message.

const KEY_STORAGE = "fam.apiKey";

const $ = (id) => document.getElementById(id);

const state = {
  file: null,
  session: null, // the selected session object, or null
  asking: null, // the AbortController of the answer being streamed
  busy: false, // an ingest is running
};

// ---- the API

class ApiError extends Error {
  constructor(message, status = null, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

async function errorFrom(response) {
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code || null;
    }
  } catch {
    // not a JSON error body (e.g. a proxy's HTML page): the status line says enough
  }
  return new ApiError(message, response.status, code);
}

// Paths are relative, so the page also works when a proxy serves the server under a path prefix.
async function api(path, { method = "GET", json, body, signal } = {}) {
  const headers = new Headers();
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(`Cannot reach the server (${err.message}).`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function apiJSON(path, options) {
  return (await api(path, options)).json();
}

// The `data:` payloads of a server-sent event stream, in order. Lines may end in CRLF, LF or CR; a CR at the
// end of a chunk is held back in case the LF of the same line ending starts the next chunk.
async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
  }
}

// The JSON events of an API stream up to `[DONE]`; an error event throws its message.
async function* apiEvents(response) {
  for await (const data of sseData(response)) {
    if (data === "[DONE]") return;
    const event = JSON.parse(data);
    if (event.error) throw new ApiError(event.error.message, null, event.error.code || null);
    yield event;
  }
  throw new ApiError("The server's answer stopped before it was complete.");
}

// ---- display helpers

function showError(err) {
  $("error-text").textContent = err.message || String(err);
  $("error").hidden = false;
  if (err.status === 401) $("api-key").focus();
}

function clearError() {
  $("error").hidden = true;
}

const number = (n) => n.toLocaleString("en-US");

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = n;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${size.toFixed(1)} ${units[unit]}`;
}

function duration(seconds) {
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.ceil(seconds % 60)} s`;
}

const displayName = (session) => (session.metadata && session.metadata.filename) || session.id;

function element(tag, props = {}, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

function updateButtons() {
  $("ingest-new").disabled = state.busy || !state.file;
  $("ingest-add").disabled = state.busy || !state.file || !state.session;
}

// ---- server health and the API key

async function checkHealth() {
  const label = $("health");
  try {
    const response = await fetch("health");
    const body = await response.json();
    if (body.status === "ok") {
      label.textContent = body.model;
      label.className = "health ok";
      return;
    }
    label.textContent = body.status === "loading" ? "model loading…" : `model failed: ${body.error}`;
    label.className = "health wait";
    if (body.status === "loading") setTimeout(checkHealth, 2000);
  } catch {
    label.textContent = "server unreachable";
    label.className = "health bad";
  }
}

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  clearError();
  selectSession(null);
  refreshSessions();
}

function forgetKey() {
  $("api-key").value = "";
  localStorage.removeItem(KEY_STORAGE);
  selectSession(null);
  refreshSessions();
}

// ---- sessions

function selectSession(session) {
  const changed = (session && session.id) !== (state.session && state.session.id);
  state.session = session;
  if (changed) $("transcript").replaceChildren();
  $("current").textContent = session
    ? `Asking about ${displayName(session)} (${number(session.tokens)} tokens, ${session.mode})`
    : "No session selected: questions go to the model alone.";
  for (const row of $("sessions").rows) row.classList.toggle("selected", !!session && row.dataset.id === session.id);
  updateButtons();
}

async function refreshSessions() {
  let sessions;
  try {
    sessions = (await apiJSON("v1/sessions")).data;
  } catch (err) {
    $("sessions").replaceChildren();
    showError(err);
    return;
  }
  sessions.sort((a, b) => b.created - a.created);
  $("sessions").replaceChildren(...sessions.map(sessionRow));
  $("no-sessions").hidden = sessions.length > 0;
  const current = state.session && sessions.find((s) => s.id === state.session.id);
  selectSession(current || null);
}

function sessionRow(session) {
  const name = displayName(session);
  const created = new Date(session.created * 1000).toLocaleString();
  const use = element("button", { type: "button", className: "quiet select", textContent: "Select" });
  use.addEventListener("click", () => selectSession(session));
  const remove = element("button", { type: "button", className: "quiet danger delete", textContent: "Delete" });
  remove.addEventListener("click", () => deleteSession(session, name));
  const label = element("td", { title: `${session.id}\ncreated ${created}` },
    element("span", { className: "name", textContent: name }),
    element("span", { className: "id", textContent: session.id }));
  const row = element("tr", {},
    label,
    element("td", { textContent: session.mode }),
    element("td", { className: "num", textContent: number(session.tokens) }),
    element("td", { className: "num", textContent: bytes(session.state_bytes) }),
    element("td", { className: "actions" }, use, remove));
  row.dataset.id = session.id;
  return row;
}

async function deleteSession(session, name) {
  if (!confirm(`Delete session ${name}? Its memory of the document is lost.`)) return;
  clearError();
  try {
    await api(`v1/sessions/${encodeURIComponent(session.id)}`, { method: "DELETE" });
  } catch (err) {
    showError(err);
  }
  await refreshSessions();
}

// ---- reading a document

function pickFile(file) {
  if (!file) return;
  if (!/\.(pdf|txt|md)$/i.test(file.name)) {
    showError(new Error(`${file.name}: only .pdf, .txt and .md files can be read.`));
    return;
  }
  clearError();
  state.file = file;
  $("drop-text").textContent = `${file.name} (${bytes(file.size)})`;
  $("drop").classList.add("chosen");
  updateButtons();
}

// The rate is measured from the first progress event, so upload and text extraction time do not lower it.
// Pages are shown for PDFs only (the server counts a text file as one page).
function showProgress(event, first, pdf) {
  const progress = $("progress");
  progress.max = Math.max(event.tokens_total, 1);
  progress.value = event.tokens_done;
  const parts = [`${number(event.tokens_done)} / ${number(event.tokens_total)} tokens`];
  if (pdf && event.pages_total) parts.push(`page ${number(event.pages_done)} / ${number(event.pages_total)}`);
  const seconds = (performance.now() - first.time) / 1000;
  const done = event.tokens_done - first.tokens;
  if (done > 0 && seconds > 0) {
    const rate = done / seconds;
    parts.push(`${number(Math.round(rate))} tokens/s`);
    const left = event.tokens_total - event.tokens_done;
    if (left > 0) parts.push(`about ${duration(left / rate)} left`);
  }
  $("progress-text").textContent = parts.join(" · ");
}

// Reads the chosen file into a new session or the selected one. A new session that fails to fill is deleted,
// so that a half-read document cannot be asked about by mistake.
async function ingest(intoNew) {
  const file = state.file;
  clearError();
  state.busy = true;
  updateButtons();
  $("ingest").hidden = false;
  $("progress").removeAttribute("value"); // indeterminate until the first event
  $("progress-text").textContent = `Uploading ${file.name} and extracting its text…`;
  const started = performance.now();
  let first = null;
  let created = null;
  try {
    let session = state.session;
    if (intoNew) {
      session = created = await apiJSON("v1/sessions", {
        method: "POST",
        json: { ...($("mode").value ? { mode: $("mode").value } : {}), metadata: { filename: file.name } },
      });
    }
    const form = new FormData();
    form.append("file", file, file.name);
    const response = await api(`v1/sessions/${encodeURIComponent(session.id)}/ingest?stream=true`, {
      method: "POST",
      body: form,
    });
    for await (const event of apiEvents(response)) {
      if (event.object === "ingest.progress") {
        first = first || { time: performance.now(), tokens: event.tokens_done };
        showProgress(event, first, /\.pdf$/i.test(file.name));
      } else if (event.object === "session") {
        session = event;
      }
    }
    const seconds = (performance.now() - started) / 1000;
    await refreshSessions();
    selectSession(session);
    $("progress").value = $("progress").max;
    $("progress-text").textContent =
      `Done: ${number(session.tokens)} tokens in session ${session.id} (${duration(seconds)}).`;
    $("question").focus();
  } catch (err) {
    $("progress-text").textContent = "Reading stopped.";
    showError(err);
    if (created) {
      try {
        await api(`v1/sessions/${encodeURIComponent(created.id)}`, { method: "DELETE" });
      } catch {
        $("progress-text").textContent = `Reading stopped; session ${created.id} holds a partial document.`;
      }
    }
    await refreshSessions();
  } finally {
    state.busy = false;
    updateButtons();
  }
}

function setUpDropZone() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  // a file dropped anywhere else must not make the browser leave the page to open it
  for (const name of ["dragover", "drop"]) document.addEventListener(name, (e) => e.preventDefault());
  drop.addEventListener("dragover", () => drop.classList.add("over"));
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
}

// ---- asking

async function ask(event) {
  event.preventDefault();
  if (state.asking) return;
  const question = $("question").value.trim();
  if (!question) return;
  clearError();
  const answer = element("div", { className: "a pending" });
  $("transcript").append(
    element("article", { className: "turn" }, element("p", { className: "q", textContent: question }), answer),
  );
  answer.scrollIntoView({ block: "end" });
  $("question").value = "";

  const request = {
    messages: [{ role: "user", content: question }],
    stream: true,
    max_tokens: Number($("max-tokens").value) || undefined,
    temperature: Number($("temperature").value),
  };
  if (state.session) {
    request.session_id = state.session.id;
    if ($("commit").checked) request.commit = true;
  }
  const controller = new AbortController();
  state.asking = controller;
  $("ask").disabled = true;
  $("stop").hidden = false;
  try {
    const response = await api("v1/chat/completions", { method: "POST", json: request, signal: controller.signal });
    for await (const chunk of apiEvents(response)) {
      const text = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (text) {
        answer.classList.remove("pending");
        answer.append(text);
        answer.scrollIntoView({ block: "end" });
      }
    }
    if (!answer.textContent) answer.append(element("em", { textContent: "(empty answer)" }));
    if (request.commit) await refreshSessions();
  } catch (err) {
    if (err.name === "AbortError") answer.append(element("em", { textContent: " (stopped)" }));
    else showError(err);
  } finally {
    answer.classList.remove("pending");
    state.asking = null;
    $("ask").disabled = false;
    $("stop").hidden = true;
  }
}

// ---- start

function start() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", saveKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("error-close").addEventListener("click", clearError);
  $("refresh").addEventListener("click", () => {
    clearError();
    refreshSessions();
  });
  setUpDropZone();
  $("ingest-new").addEventListener("click", () => ingest(true));
  $("ingest-add").addEventListener("click", () => ingest(false));
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.asking && state.asking.abort());
  checkHealth();
  refreshSessions();
}

start();
