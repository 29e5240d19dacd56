// The operators' console: plain DOM, no build step, no third-party code. Everything it shows
// comes from the admin API (/admin/v1/...) and the TTS server, with the admin key kept in
// sessionStorage (this tab only). Text from the database is only ever set as textContent.
"use strict";

const KEY = "trtc-admin-key";
const $ = (selector) => document.querySelector(selector);
const api = (path) => new URL(`../${path}`, location.href).toString();

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child));
  return node;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function call(path, options = {}) {
  const response = await fetch(api(path), {
    ...options,
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, ...(options.headers || {}) },
  });
  if (response.status === 401) { signOut("The admin key was refused."); throw new ApiError(401, "unauthorized"); }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response;
}

const getJson = async (path) => (await call(path)).json();
const isoOrNull = (local) => (local ? new Date(local).toISOString() : null);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "-");
const ms = (value) => (value === null || value === undefined ? "-" : `${Math.round(value)}`);

// -- sign-in and views ------------------------------------------------------------------------

function show(view) {
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `${view}-view`;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === view);
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  $("#nav").hidden = true;
  $("#signin-error").textContent = message;
  show("signin");
}

async function signIn(key) {
  const response = await fetch(api("admin/v1/tasks?limit=1"), { headers: { Authorization: `Bearer ${key}` } });
  if (response.status === 404) throw new Error("The admin API is off on this server (set ADMIN_API_KEYS).");
  if (!response.ok) throw new Error("That key was refused.");
  sessionStorage.setItem(KEY, key);
}

async function route() {
  if (!sessionStorage.getItem(KEY)) { show("signin"); return; }
  $("#nav").hidden = false;
  const [view, ...rest] = location.hash.slice(1).split("/");
  try {
    if (view === "task") { show("conversation"); await loadConversation(decodeURIComponent(rest.join("/"))); }
    else if (view === "latency") { show("latency"); await loadStats(); }
    else if (view === "tts") { show("tts"); await loadVoices(); }
    else if (view === "knowledge") { show("knowledge"); await loadKnowledge(); }
    else { show("tasks"); await loadTasks(false); }
  } catch (error) {
    if (error.status !== 401) alert(error.message);
  }
}

// -- task list --------------------------------------------------------------------------------

let nextCursor = null;

async function loadTasks(more) {
  const form = new FormData($("#filters"));
  const params = new URLSearchParams({ limit: "50" });
  for (const name of ["user_id", "room_id", "sdk_app_id"]) if (form.get(name)) params.set(name, form.get(name));
  for (const name of ["since", "until"]) if (form.get(name)) params.set(name, isoOrNull(form.get(name)));
  if (more && nextCursor) params.set("cursor", nextCursor);
  const page = await getJson(`admin/v1/tasks?${params}`);
  const body = $("#tasks tbody");
  if (!more) body.replaceChildren();
  for (const task of page.data) {
    body.append(el("tr", { "data-task": task.task_id, onclick: () => { location.hash = `task/${encodeURIComponent(task.task_id)}`; } },
      el("td", {}, task.task_id), el("td", {}, task.user_id ?? "-"), el("td", {}, task.room_id ?? "-"),
      el("td", {}, when(task.first_activity)), el("td", {}, when(task.last_activity)),
      el("td", {}, task.rounds), el("td", {}, task.interrupted), el("td", {}, task.errors)));
  }
  nextCursor = page.next_cursor;
  $("#more").hidden = !nextCursor;
}

// -- one conversation -------------------------------------------------------------------------

let current = null;

// The rounds the user spoke, as the task list counts them; the welcome (round 0) said apart.
function roundCount(rounds) {
  const spoken = rounds.filter((r) => r.finish_reason !== "welcome").length;
  return `${spoken} round${spoken === 1 ? "" : "s"}` + (spoken < rounds.length ? " and the welcome" : "");
}

async function loadConversation(taskId) {
  const task = await getJson(`admin/v1/tasks/${encodeURIComponent(taskId)}`);
  current = task;
  $("#conversation-title").textContent = task.task_id;
  $("#conversation-meta").textContent =
    `user ${task.user_id ?? "-"} · room ${task.room_id ?? "-"} · SdkAppId ${task.sdk_app_id ?? "-"} · ` +
    `${roundCount(task.rounds)} · ${when(task.first_activity)} to ${when(task.last_activity)}` +
    (task.ended_at ? ` · ended ${when(task.ended_at)} (LeaveCode ${task.leave_code ?? "-"})` : "");
  const user = endUser(task);
  $("#delete-user").disabled = !(user.app != null && user.id);
  $("#conversation-summary").textContent = task.summary
    ? `Summary of rounds 1-${task.summary.through_seq}${task.summary.stale ? " (being redone)" : ""}: ${task.summary.text}` : "";
  const memory = task.user_memory;
  $("#conversation-user-memory").textContent = memory
    ? `Memory of user ${memory.user_id} (profile ${memory.profile}): ${memory.now ?? "none yet"}` +
      ` · as this task began: ${memory.at_start ?? "none"} · rounds 1-${memory.folded_through_seq} of this task are in it` : "";
  const failedBy = {};
  for (const failure of task.failed_requests) (failedBy[failure.request_id] ||= []).push(failure);
  $("#rounds").replaceChildren(...task.rounds.map((r) => roundCard(r, failedBy[r.request_id] || [])),
    ...task.failed_requests.filter((f) => !task.rounds.some((r) => r.request_id === f.request_id)).map(failedCard));
  $("#task-events").replaceChildren(...(task.events.length
    ? task.events.map((e) => el("li", {}, `${e.event_type} at ${when(e.received_at)}: ${JSON.stringify(e.payload)}`))
    : [el("li", {}, "none")]));
  $("#round-latency").replaceChildren(roundChart(task.rounds));
}

function roundCard(round, failures) {
  const badges = [el("span", { class: "badge" }, round.finish_reason === "welcome" ? "welcome" : round.status)];
  if (round.interrupted && round.status !== "interrupted") badges.push(el("span", { class: "badge interrupted" }, "interrupted"));
  if (round.fast_reply) badges.push(el("span", { class: "badge fast-reply", title: "said by the fast-reply model before the answer" }, "fast reply"));
  if (round.error) badges.push(el("span", { class: "badge error" }, `upstream error: ${round.error}`));
  if (failures.length) badges.push(el("span", { class: "badge retried" }, `retried after ${failures.length} failed attempt(s)`));
  const metrics = Object.entries(round.orchestrator_metrics).map(([name, value]) => `${name} ${value} ms`).join(", ");
  const user = round.messages.filter((m) => m.role === "user").map((m) => m.content).join("\n");
  // What was said before tool calls was spoken too: the reply is every assistant text in order.
  const heard = round.messages.filter((m) => m.role === "assistant").map((m) => m.content ?? "").join("");
  return el("article", { class: "round", "data-seq": round.seq },
    el("header", {}, el("strong", {}, `#${round.seq}`), badges,
      el("span", {}, `first token ${ms(round.first_token_ms)} ms · total ${ms(round.total_ms)} ms`),
      round.profile ? el("span", {}, `profile ${round.profile}`) : null,
      round.upstream ? el("span", {}, round.upstream) : null,
      metrics ? el("span", {}, `orchestrator: ${metrics}`) : null),
    el("div", { class: "turn" },
      el("span", { class: "who" }, "user"), el("span", { class: "said" }, user),
      el("span", { class: "who" }, "tools"), el("div", {}, toolCalls(round.messages)),
      el("span", { class: "who" }, "knowledge"), el("div", { class: "knowledge" }, passagesUsed(round.knowledge)),
      el("span", { class: "who" }, "assistant"),
      el("div", { class: "columns" },
        el("div", {}, el("div", { class: "muted" }, "as the model wrote it"),
          el("span", { class: "said model-reply" }, ...withFastLine(heard, round.fast_reply),
            round.unheard ? el("span", { class: "unheard" }, round.unheard) : null)),
        el("div", {}, el("div", { class: "muted" }, round.unheard === null ? "heard (no 905 yet: all that was sent)" : "what the user heard"),
          el("span", { class: "said heard" }, heard)))));
}

function toolCalls(messages) {
  const results = Object.fromEntries(messages.filter((m) => m.role === "tool").map((m) => [m.tool_call_id, m.content]));
  const calls = messages.flatMap((m) => m.tool_calls || []);
  if (!calls.length) return el("span", { class: "muted" }, "-");
  return calls.map((c) => el("details", { class: "tool-call" },
    el("summary", {}, `${c.function?.name}(${c.function?.arguments ?? ""})`),
    el("pre", {}, results[c.id] ?? "(no result)")));
}

function failedCard(failure) {
  return el("article", { class: "round failed" },
    el("header", {}, el("span", { class: "badge error" }, `failed: ${failure.code}`), el("span", {}, when(failure.occurred_at))),
    el("p", { class: "muted" }, failure.message ?? ""));
}

// A bar chart of the proxy's time to first token per round, with the orchestrator's
// llm_first_token beside it where a 906 callback reported one.
function roundChart(rounds) {
  const width = 760, height = 180, pad = 30;
  const values = rounds.flatMap((r) => [r.first_token_ms ?? 0, r.orchestrator_metrics.llm_first_token ?? 0]);
  const top = Math.max(1, ...values);
  const slot = (width - pad) / Math.max(1, rounds.length);
  const bar = Math.max(2, slot / 2 - 2);
  const y = (value) => height - pad - (value / top) * (height - 2 * pad);
  const chart = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "time to first token per round" },
    svg("text", { x: 4, y: 14, "font-size": 11, fill: "#5b6476" }, `${Math.round(top)} ms`),
    svg("line", { x1: pad, y1: height - pad, x2: width, y2: height - pad, stroke: "#9aa4b8" }));
  rounds.forEach((r, i) => {
    const x = pad + i * slot;
    if (r.first_token_ms !== null) {
      chart.append(svg("rect", { class: "proxy-ttft", x, y: y(r.first_token_ms), width: bar, height: height - pad - y(r.first_token_ms), fill: "#3b6fd8" },
        svg("title", {}, `#${r.seq}: proxy ${r.first_token_ms} ms`)));
    }
    const orchestrator = r.orchestrator_metrics.llm_first_token;
    if (typeof orchestrator === "number") {
      chart.append(svg("rect", { class: "orchestrator-ttft", x: x + bar + 1, y: y(orchestrator), width: bar, height: height - pad - y(orchestrator), fill: "#e39b2d" },
        svg("title", {}, `#${r.seq}: orchestrator ${orchestrator} ms`)));
    }
    chart.append(svg("text", { x, y: height - pad + 14, "font-size": 10, fill: "#5b6476" }, `#${r.seq}`));
  });
  return el("div", {}, chart, el("div", { class: "legend" }, "blue: the proxy's time to first token; orange: the orchestrator's llm_first_token (event 906)"));
}

async function confirmed(text) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = text;
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

async function deleteTask() {
  if (!current || !(await confirmed(`Delete task ${current.task_id} and everything stored for it? This cannot be undone.`))) return;
  await call(`admin/v1/tasks/${encodeURIComponent(current.task_id)}`, { method: "DELETE" });
  location.hash = "tasks";
}

// The task's end user: whose memory it keeps (`memory.per_user`, maybe a MetaInfo id), else its X-User-Id.
function endUser(task) {
  return task.user_memory ? { app: task.user_memory.sdk_app_id, id: task.user_memory.user_id } : { app: task.sdk_app_id, id: task.user_id };
}

async function deleteUser() {
  const user = current && endUser(current);
  if (!user || !(await confirmed(`Delete every task and the memory of user ${user.id} (SdkAppId ${user.app})? This cannot be undone.`))) return;
  // "-": no X-Sdk-App-Id came with the user's requests.
  await call(`admin/v1/users/${encodeURIComponent(user.app || "-")}/${encodeURIComponent(user.id)}`, { method: "DELETE" });
  location.hash = "tasks";
}

// -- latency ----------------------------------------------------------------------------------

async function loadStats() {
  const form = new FormData($("#stats-range"));
  const params = new URLSearchParams();
  for (const name of ["since", "until"]) if (form.get(name)) params.set(name, isoOrNull(form.get(name)));
  const stats = await getJson(`admin/v1/stats?${params}`);
  const t = stats.total;
  $("#stats-total").textContent = `${t.rounds} rounds from ${when(stats.since)} to ${when(stats.until)}: ` +
    `${t.outcomes.completed} completed, ${t.outcomes.interrupted} interrupted, ${t.outcomes.upstream_error} upstream errors, ` +
    `${t.outcomes.failed} failed requests; first token p50 ${ms(t.first_token_ms.p50)} ms, p99 ${ms(t.first_token_ms.p99)} ms`;
  $("#hours tbody").replaceChildren(...stats.hours.map((h) => el("tr", {},
    el("td", {}, when(h.hour)), el("td", {}, h.rounds), el("td", {}, h.outcomes.completed), el("td", {}, h.outcomes.interrupted),
    el("td", {}, h.outcomes.upstream_error), el("td", {}, h.outcomes.failed), el("td", {}, ms(h.first_token_ms.p50)),
    el("td", {}, ms(h.first_token_ms.p90)), el("td", {}, ms(h.first_token_ms.p99)), el("td", {}, ms(h.total_ms.p50)))));
  $("#hourly").replaceChildren(hourlyChart(stats.hours));
}

function hourlyChart(hours) {
  const width = 760, height = 200, pad = 30;
  const series = [["p50", "#3b6fd8"], ["p90", "#e39b2d"], ["p99", "#b3261e"]];
  const top = Math.max(1, ...hours.flatMap((h) => series.map(([p]) => h.first_token_ms[p] ?? 0)));
  const x = (i) => pad + (hours.length > 1 ? (i / (hours.length - 1)) * (width - 2 * pad) : (width - 2 * pad) / 2);
  const y = (value) => height - pad - (value / top) * (height - 2 * pad);
  const chart = svg("svg", { id: "hourly-chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "time to first token percentiles per hour" },
    svg("text", { x: 4, y: 14, "font-size": 11, fill: "#5b6476" }, `${Math.round(top)} ms`),
    svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#9aa4b8" }));
  for (const [p, color] of series) {
    const points = hours.map((h, i) => [x(i), h.first_token_ms[p]]).filter(([, v]) => v !== null);
    if (!points.length) continue;
    chart.append(svg("polyline", { class: `hourly-${p}`, fill: "none", stroke: color, "stroke-width": 2, points: points.map(([px, v]) => `${px},${y(v)}`).join(" ") }));
    for (const [px, v] of points) chart.append(svg("circle", { cx: px, cy: y(v), r: 3, fill: color }, svg("title", {}, `${p} ${v} ms`)));
  }
  return el("div", {}, chart, el("div", { class: "legend" }, "time to first token per hour: p50 blue, p90 orange, p99 red"));
}

// -- TTS playground ---------------------------------------------------------------------------

async function loadVoices() {
  if ($("#tts-voice").options.length) return;
  const voices = await getJson("api/v1/tts/voices");
  $("#tts-voice").replaceChildren(...voices.voices.map((v) =>
    el("option", { value: v.name, ...(v.name === voices.default ? { selected: "" } : {}) }, `${v.name} (${v.language})`)));
}

// Each API's formats: the TRTC route's, and OpenAI's speech API's (all at 24 kHz).
const TTS_FORMATS = {
  trtc: [["wav", "wav"], ["pcm", "pcm (audio/L16)"], ["mp3", "mp3"], ["ogg_opus", "ogg_opus"]],
  openai: [["mp3", "mp3"], ["opus", "opus (Ogg)"], ["aac", "aac (ADTS)"], ["flac", "flac"], ["wav", "wav"], ["pcm", "pcm (24 kHz)"]],
};
const OPENAI_RATE = 24000;

function pickApi() {
  const api = $("#tts-api").value;
  $("#tts-format").replaceChildren(...TTS_FORMATS[api].map(([value, label]) => el("option", { value }, label)));
  // OpenAI's audio is always 24 kHz: shown as such (greyed) while that API is picked, and the
  // operator's own choice back when they return to the TRTC route.
  const rate = $("#tts-rate");
  if (api === "openai" && !rate.disabled) { rate.dataset.chosen = rate.value; rate.value = String(OPENAI_RATE); }
  if (api !== "openai" && rate.disabled) rate.value = rate.dataset.chosen || "16000";
  rate.disabled = api === "openai";
}

// The request for the chosen API: the TRTC route takes speed in its URL, OpenAI's in its body.
function ttsRequest(api, format, rate, speed) {
  const text = $("#tts-text").value;
  const voice = $("#tts-voice").value;
  if (api === "openai") {
    return ["v1/audio/speech", { model: "tts-1", input: text, voice, response_format: format, speed }];
  }
  return [`api/v1/tts/stream?speed=${speed}`, { Text: text, Voice: voice, Format: format, SampleRate: rate, Channel: 1 }];
}

// Plays PCM and WAV as they arrive (Web Audio), and MP3 too where the browser's Media Source
// takes it, so what the page plays starts where the orchestrator's would; the whole answer then
// stays in the <audio> element to replay. Ogg Opus, AAC and FLAC play once whole; their
// first-audio time is still the first byte's.
async function speak() {
  $("#tts-error").textContent = "";
  $("#first-audio").textContent = $("#all-audio").textContent = "-";
  const api = $("#tts-api").value;
  const format = $("#tts-format").value;
  const rate = api === "openai" ? OPENAI_RATE : Number($("#tts-rate").value);
  const [path, body] = ttsRequest(api, format, rate, Number($("#tts-speed").value) || 1);
  let context = null;
  try { context = new AudioContext({ sampleRate: rate }); } catch (_) { /* no audio output: still measure and keep the clip */ }
  const started = performance.now();
  let response;
  try {
    response = await call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (error) {
    $("#tts-error").textContent = error.message;
    return;
  }
  const reader = response.body.getReader();
  if (format !== "pcm" && format !== "wav") {
    await playEncoded(reader, response.headers.get("content-type"), started);
    return;
  }
  let pending = new Uint8Array(0);
  let headerDone = format !== "wav";
  const pcm = [];
  let playAt = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if ($("#first-audio").textContent === "-") $("#first-audio").textContent = Math.round(performance.now() - started);
    pending = concat(pending, value);
    if (!headerDone) {
      const offset = wavDataOffset(pending);
      if (offset < 0) continue;
      pending = pending.slice(offset);
      headerDone = true;
    }
    const usable = pending.length - (pending.length % 2);
    const chunk = pending.slice(0, usable);
    pending = pending.slice(usable);
    if (!chunk.length) continue;
    pcm.push(chunk);
    if (context) playAt = schedule(context, chunk, rate, playAt);
  }
  $("#all-audio").textContent = Math.round(performance.now() - started);
  const audio = $("#tts-audio");
  audio.src = URL.createObjectURL(new Blob([wavHeader(pcm.reduce((n, c) => n + c.length, 0), rate), ...pcm], { type: "audio/wav" }));
}

async function playEncoded(reader, type, started) {
  const audio = $("#tts-audio");
  const streamed = Boolean(window.MediaSource && MediaSource.isTypeSupported(type) && type === "audio/mpeg");
  audio.dataset.streamed = String(streamed);
  let source = null;
  let buffer = null;
  if (streamed) {
    source = new MediaSource();
    audio.src = URL.createObjectURL(source);
    await new Promise((resolve) => source.addEventListener("sourceopen", resolve, { once: true }));
    buffer = source.addSourceBuffer(type);
    buffer.mode = "sequence";
  }
  const parts = [];
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (!parts.length) $("#first-audio").textContent = Math.round(performance.now() - started);
    parts.push(value);
    if (buffer) {
      buffer.appendBuffer(value);
      await new Promise((resolve) => buffer.addEventListener("updateend", resolve, { once: true }));
      if (parts.length === 1) audio.play().catch(() => { /* autoplay refused: the player is there to press */ });
    }
  }
  $("#all-audio").textContent = Math.round(performance.now() - started);
  if (source) {
    source.endOfStream();
    return;
  }
  // OpenAI's `audio/opus` is Ogg Opus, which browsers play as `audio/ogg`.
  audio.src = URL.createObjectURL(new Blob(parts, { type: type === "audio/opus" ? "audio/ogg" : type }));
  audio.play().catch(() => { /* autoplay refused: the player is there to press */ });
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a); out.set(b, a.length);
  return out;
}

function wavDataOffset(bytes) {
  for (let i = 12; i + 8 <= bytes.length; i++) {
    if (bytes[i] === 0x64 && bytes[i + 1] === 0x61 && bytes[i + 2] === 0x74 && bytes[i + 3] === 0x61) return i + 8;
  }
  return -1;
}

function schedule(context, chunk, rate, playAt) {
  const samples = new Int16Array(chunk.buffer, chunk.byteOffset, chunk.length / 2);
  const buffer = context.createBuffer(1, samples.length, rate);
  const channel = buffer.getChannelData(0);
  for (let i = 0; i < samples.length; i++) channel[i] = samples[i] / 32768;
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(context.destination);
  const at = Math.max(playAt, context.currentTime);
  source.start(at);
  return at + buffer.duration;
}

function wavHeader(dataBytes, rate) {
  const view = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + dataBytes, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true); view.setUint16(34, 16, true);
  text(36, "data"); view.setUint32(40, dataBytes, true);
  return view.buffer;
}

// -- wiring -----------------------------------------------------------------------------------

// The reply with its fast-reply line marked (the line is where the reply begins).
function withFastLine(text, line) {
  if (!line || !text.startsWith(line)) return [text];
  return [el("mark", { class: "fast-line", title: "fast reply" }, line), text.slice(line.length)];
}

function passagesUsed(used) {
  if (!used || !used.length) return el("span", { class: "muted" }, "none");
  return el("ul", {}, ...used.map((p) => el("li", {}, `${p.base} / ${p.document} #${p.chunk} · score ${p.score}`)));
}

// -- knowledge --------------------------------------------------------------------------------

const KB_TYPES = { md: "text/markdown", markdown: "text/markdown", txt: "text/plain", html: "text/html", htm: "text/html", pdf: "application/pdf" };
const kbPath = (...parts) => `admin/v1/knowledge/${parts.map(encodeURIComponent).join("/")}`;

async function loadKnowledge() {
  const bases = (await getJson("admin/v1/knowledge")).data;
  $("#kb-bases tbody").replaceChildren(...bases.map((b) => el("tr", {},
    el("td", {}, el("a", { href: "#knowledge", onclick: (e) => { e.preventDefault(); loadDocuments(b.name); } }, b.name)),
    el("td", {}, String(b.documents)), el("td", {}, String(b.chunks)), el("td", {}, b.embedding_model || "lexical only"),
    el("td", {}, when(b.updated_at)),
    el("td", {}, el("button", { type: "button", class: "danger", onclick: () => deleteKnowledge(b.name) }, "Delete base")))));
  const select = $("#kb-search-base");
  const chosen = select.value;
  select.replaceChildren(...bases.map((b) => el("option", { value: b.name }, b.name)));
  if (bases.some((b) => b.name === chosen)) select.value = chosen;
}

async function loadDocuments(base) {
  const docs = (await getJson(kbPath(base, "documents"))).data;
  $("#kb-documents").replaceChildren(el("h2", {}, `Documents of ${base}`), el("table", { id: "kb-docs" },
    el("thead", {}, el("tr", {}, el("th", {}, "Document"), el("th", {}, "Title"), el("th", {}, "Type"), el("th", {}, "Chunks"), el("th", {}, ""))),
    el("tbody", {}, ...docs.map((d) => el("tr", {}, el("td", {}, d.id), el("td", {}, d.title || ""), el("td", {}, d.content_type),
      el("td", {}, String(d.chunks)),
      el("td", {}, el("button", { type: "button", class: "danger", onclick: () => deleteKnowledge(base, d.id) }, "Delete")))))));
}

async function uploadKnowledge() {
  const file = $("#kb-file").files[0];
  const base = $("#kb-base").value.trim();
  const ext = file.name.split(".").pop().toLowerCase();
  const id = $("#kb-doc").value.trim() || file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[-.]+/, "") || "document";
  $("#kb-status").textContent = `Uploading ${file.name}…`;
  try {
    const stored = await (await call(`${kbPath(base, "documents", id)}?title=${encodeURIComponent(file.name)}`, {
      method: "PUT", body: file, headers: { "Content-Type": KB_TYPES[ext] || file.type || "application/octet-stream" },
    })).json();
    $("#kb-status").textContent = `${stored.base}/${stored.id}: ${stored.chunks} chunks from ${stored.chars} characters.`;
  } catch (error) {
    $("#kb-status").textContent = `Not stored: ${error.message}`;
    return;
  }
  await loadKnowledge();
  await loadDocuments(base);
}

async function deleteKnowledge(base, doc) {
  if (!(await confirmed(doc ? `Delete document ${doc} from ${base}?` : `Delete knowledge base ${base} with all its documents?`))) return;
  await call(doc ? kbPath(base, "documents", doc) : kbPath(base), { method: "DELETE" });
  $("#kb-documents").replaceChildren();
  await loadKnowledge();
  if (doc) await loadDocuments(base);
}

async function tryQuery() {
  const base = $("#kb-search-base").value;
  const found = await (await call(`${kbPath(base)}/search`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ query: $("#kb-query").value, top_k: 5 }),
  })).json();
  $("#kb-results").replaceChildren(...(found.results.length ? found.results.map((r) => el("li", { class: "passage" },
    el("div", { class: "muted" }, `score ${r.score} · ${r.document} · ${r.heading}`), el("div", { class: "said" }, r.text)))
    : [el("li", { class: "muted" }, "Nothing matches.")]));
}

window.addEventListener("hashchange", route);
document.addEventListener("DOMContentLoaded", () => {
  $("#signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    try { await signIn($("#key").value); $("#key").value = ""; $("#signin-error").textContent = ""; location.hash = "tasks"; await route(); }
    catch (error) { $("#signin-error").textContent = error.message; }
  });
  $("#sign-out").addEventListener("click", () => signOut());
  $("#filters").addEventListener("submit", (event) => { event.preventDefault(); loadTasks(false); });
  $("#more").addEventListener("click", () => loadTasks(true));
  $("#stats-range").addEventListener("submit", (event) => { event.preventDefault(); loadStats(); });
  $("#tts-api").addEventListener("change", pickApi);
  $("#tts-form").addEventListener("submit", (event) => { event.preventDefault(); speak(); });
  $("#delete-task").addEventListener("click", deleteTask);
  $("#delete-user").addEventListener("click", deleteUser);
  $("#kb-upload").addEventListener("submit", (event) => { event.preventDefault(); uploadKnowledge(); });
  $("#kb-search").addEventListener("submit", (event) => { event.preventDefault(); tryQuery().catch((e) => alert(e.message)); });
  route();
});
