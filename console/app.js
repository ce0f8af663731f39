// The tailcast console: lists streams, follows one live through the JavaScript client,
// replays from any seq, answers input requests and sends stop. Public API only.

import { TailcastClient } from "/console/tailcast.js";
import { StreamView, stopAnswer } from "/console/render.js";
import { buildForm } from "/console/schema-form.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "tailcast.console.token";

const state = {
  client: null,
  stream: null,
  sub: null,
  nextAfterName: null,
  inputs: new Map(), // request_id -> card element
  closed: false,
  // Seq of the control.stop this console sent, until the agent answers it.
  pendingStop: null,
  // The followed stream's pace, from event times (commit times, so replays measure the same).
  pace: { createdAt: null, firstToken: null, tokenTimes: [], lastEvent: null },
};

/** "12 s ago", "3 min ago", "2 h ago", "4 d ago". */
function ago(time) {
  const s = Math.max(0, Math.round((Date.now() - new Date(time).getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** A stream with no event for this long, and not closed, is shown as idle (maybe abandoned). */
const IDLE_MS = 10 * 60 * 1000;

const view = new StreamView({
  text: $("output-text"),
  progress: $("progress"),
  events: $("events"),
  count: $("events-count"),
});

// ---- messages ----------------------------------------------------------------------------

function showBanner(text, kind = "error") {
  const b = $("banner");
  b.textContent = text;
  b.className = `banner ${kind}`;
  b.hidden = false;
}

function clearBanner() {
  $("banner").hidden = true;
}

/** Turns an API error into words a person can act on. */
function explain(err, what) {
  if (err?.status === 401 || err?.code === "unauthorized") {
    return `Unauthorized (401) while ${what}: this server needs a valid token. Enter one at the top right.`;
  }
  if (err?.status === 403 || err?.code === "forbidden") {
    return `Forbidden (403) while ${what}: the token has no grant for this. ${err.message ?? ""}`;
  }
  if (err?.code === "network") return `Cannot reach the server while ${what}: ${err.message}`;
  return `${what}: ${err?.code ? err.code + ": " : ""}${err?.message ?? err}`;
}

function report(err, what) {
  showBanner(explain(err, what));
}

// ---- token -------------------------------------------------------------------------------

function storedToken() {
  try {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

function storeToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // Private mode without storage: the token lasts as long as the page.
  }
}

function showTokenState() {
  $("token-state").textContent = state.client.token ? "token set" : "no token";
}

function useToken(token) {
  storeToken(token);
  state.client.setToken(token);
  showTokenState();
  clearBanner();
  refreshStreams();
  refreshServerStats();
  if (state.stream) watch(state.stream, { after: state.sub?.cursor ?? 0, keep: true });
}

// ---- stream list -------------------------------------------------------------------------

function streamItem(s) {
  const li = document.createElement("li");
  li.dataset.stream = s.name;
  if (s.name === state.stream) li.classList.add("selected");
  const a = document.createElement("a");
  a.href = `#${encodeURIComponent(s.name)}`;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = s.name;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `${s.head}`;
  meta.title = `head seq ${s.head}, last event ${s.updated_at}`;
  // Followers on every node now (this console's own subscription counts when it follows it).
  const subs = document.createElement("span");
  subs.className = "subs";
  subs.textContent = `${s.subscribers ?? 0}`;
  subs.title = `${s.subscribers ?? 0} following now`;
  subs.classList.toggle("none", !s.subscribers);
  const when = document.createElement("span");
  when.className = "when";
  const active = s.last_activity_at ?? s.updated_at;
  when.textContent = ago(active);
  when.title = `last activity (event or heartbeat) at ${new Date(active).toLocaleString()}`;
  a.append(name, meta, subs, when);
  if (s.lease_s && !s.closed) {
    const l = document.createElement("span");
    l.className = "pill lease";
    l.textContent = "lease";
    l.title = `lease of ${s.lease_s} s: closed as abandoned at ${new Date(s.lease_expires_at).toLocaleString()} unless its producer appends or heartbeats`;
    a.append(l);
  }
  if (s.closed) {
    const c = document.createElement("span");
    c.className = "pill closed";
    c.textContent = "closed";
    a.append(c);
  } else if (!s.lease_s && Date.now() - new Date(active).getTime() > IDLE_MS) {
    // Not closed, but quiet for long: a producer that died without closing looks like this.
    const c = document.createElement("span");
    c.className = "pill idle";
    c.textContent = "idle";
    c.title = "no event for over 10 minutes and not closed: its producer may have stopped";
    a.append(c);
  }
  li.append(a);
  return li;
}

async function refreshStreams({ append = false } = {}) {
  const prefix = $("filter").value.trim();
  try {
    const page = await state.client.listStreams({
      prefix: prefix || undefined,
      limit: 100,
      afterName: append ? state.nextAfterName : undefined,
    });
    const hideClosed = $("hide-closed").checked;
    const items = page.streams.filter((s) => !(hideClosed && s.closed)).map(streamItem);
    if (append) $("streams").append(...items);
    else $("streams").replaceChildren(...items);
    if (!append && items.length === 0) {
      const li = document.createElement("li");
      li.className = "muted none";
      li.textContent = prefix ? `No stream starts with “${prefix}”.` : "No streams yet.";
      $("streams").append(li);
    }
    state.nextAfterName = page.next_after_name ?? null;
    $("more").hidden = !state.nextAfterName;
  } catch (err) {
    if (err.status !== 403) {
      report(err, "listing streams");
      return;
    }
    // A token scoped to some streams may follow them without listing: say so in place
    // instead of interrupting the person with a banner.
    const li = document.createElement("li");
    li.className = "muted none";
    li.id = "streams-forbidden";
    li.textContent = `This token may not list ${prefix ? `streams starting with “${prefix}”` : "all streams"}: ${err.message}`;
    $("streams").replaceChildren(li);
    $("more").hidden = true;
  }
}

// ---- watching one stream -----------------------------------------------------------------

function setStreamStatus(text, cls) {
  const s = $("stream-status");
  s.textContent = text;
  s.className = `pill ${cls ?? ""}`;
}

/** A closed (or deleted) stream takes no stop and cannot be closed again: say so up front. */
function setClosed(closed) {
  state.closed = closed;
  for (const id of ["stop-btn", "stop-reason", "close-btn"]) $(id).disabled = closed;
  $("stop-btn").title = closed ? "The stream is closed: there is no producer to stop" : "Ask the producer to stop (appends control.stop)";
}

function resetPace() {
  state.pace = { createdAt: null, firstToken: null, tokenTimes: [], lastEvent: null };
}

function notePace(ev) {
  const t = Date.parse(ev.time);
  if (Number.isNaN(t)) return;
  const p = state.pace;
  p.lastEvent = Math.max(p.lastEvent ?? 0, t);
  if (ev.type !== "token") return;
  if (p.firstToken === null && ev.seq !== undefined) p.firstToken = t;
  p.tokenTimes.push(t);
  // Only the last few seconds matter for the rate.
  const newest = p.tokenTimes[p.tokenTimes.length - 1];
  while (p.tokenTimes.length > 2 && p.tokenTimes[0] < newest - 5000) p.tokenTimes.shift();
}

/** Tokens per second over the last 5 s of tokens, time to first token, last activity. */
function showPace() {
  const p = state.pace;
  const times = p.tokenTimes;
  const span = times.length > 1 ? (times[times.length - 1] - times[0]) / 1000 : 0;
  $("pace-rate").textContent = span > 0 ? ((times.length - 1) / span).toFixed(1) : "–";
  $("pace-ttft").textContent =
    p.firstToken !== null && p.createdAt !== null ? `${((p.firstToken - p.createdAt) / 1000).toFixed(2)} s` : "–";
  $("pace-last").textContent = p.lastEvent ? ago(p.lastEvent) : "–";
  const idle = !state.closed && p.lastEvent && Date.now() - p.lastEvent > IDLE_MS;
  $("pace-last").classList.toggle("stale", Boolean(idle));
}

/**
 * Follows `stream` from `after` (or from now), replacing whatever was shown. `keep` keeps
 * the rendered events (a reconnect with a new token continues where it was).
 */
function watch(stream, { after = 0, from, keep = false } = {}) {
  state.sub?.unsubscribe();
  state.sub = null;
  if (state.stream !== stream || !keep) {
    view.reset();
    clearInputs();
    resetPace();
    setClosed(false);
    state.pendingStop = null;
  }
  state.stream = stream;
  $("empty").hidden = true;
  $("stream-view").hidden = false;
  $("stream-name").textContent = stream;
  document.title = `${stream} · tailcast`;
  for (const li of $("streams").children) li.classList.toggle("selected", li.dataset.stream === stream);
  // Opened from its start, a stream is followed compacted: a long answer's catch-up comes as
  // one row per message (each run of appends folded; the log keeps every token), then the
  // live tail event by event. A replay from a seq shows every event.
  const compact = !from && after === 0;
  setStreamStatus(from === "now" ? "live from now" : after > 0 ? `replay from ${after + 1}` : "live", "live");
  const opts = from ? { from } : { after, compact };
  opts.onNotice = (n) => {
    const row = { stream, seq: "·", type: `notice.${n.notice}`, data: n, time: new Date().toISOString() };
    view.addRow(row);
    if (n.notice === "deleted") {
      setStreamStatus("deleted", "closed");
      setClosed(true);
    }
  };
  opts.onEnd = (reason) => {
    if (reason === "closed") setStreamStatus("closed", "closed");
    if (reason === "deleted") setStreamStatus("deleted", "closed");
    if (reason === "closed" || reason === "deleted") setClosed(true);
  };
  opts.onError = (err) => {
    setStreamStatus("error", "closed");
    report(err, `following ${stream}`);
  };
  try {
    state.sub = state.client.subscribe(stream, opts, (ev) => onEvent(stream, ev));
  } catch (err) {
    report(err, `following ${stream}`);
    return;
  }
  loadInputs(stream);
  showCursor();
  refreshHead();
}

let connFrame = 0;
let listRefresh = 0;

function onEvent(stream, ev) {
  if (stream !== state.stream) return;
  view.add(ev);
  // Counters follow the events, at most once a frame however fast events come.
  if (!connFrame) {
    connFrame = requestAnimationFrame(() => {
      connFrame = 0;
      showConnection();
    });
  }
  const item = $("streams").querySelector(`li[data-stream="${CSS.escape(stream)}"] .meta`);
  if (item) item.textContent = String(ev.seq);
  // A stream created while we watched it joins the list without waiting for the next poll.
  if (!listRefresh && stream.startsWith($("filter").value.trim()) && !$("streams").querySelector(`li[data-stream="${CSS.escape(stream)}"]`)) {
    listRefresh = setTimeout(() => {
      listRefresh = 0;
      refreshStreams();
    }, 300);
  }
  if (ev.type === "input.requested") addInput(stream, { ...ev.data, seq: ev.seq });
  if (ev.type === "input.answered" || ev.type === "input.expired") resolveInput(ev);
  if (ev.type === "stream.closed") setClosed(true);
  noteStopAnswer(ev);
  notePace(ev);
  showPace();
  showCursor();
}

function showCursor() {
  const sub = state.sub;
  $("stream-cursor").textContent = sub?.cursor ?? "–";
  const head = Number($("stream-head").textContent) || 0;
  if (sub?.cursor > head) $("stream-head").textContent = sub.cursor;
}

/** The stream's lease: its length and when it lapses unless renewed. */
function showLease(info) {
  const lease = $("stream-lease");
  if (!info.lease_s || info.closed) {
    lease.textContent = "none";
    lease.title = info.closed ? "the stream is closed" : "no lease: the stream stays open until closed";
    return;
  }
  const left = Math.round((Date.parse(info.lease_expires_at) - Date.now()) / 1000);
  lease.textContent = `${info.lease_s} s, ${left > 0 ? `lapses in ${left} s` : "lapsing"}`;
  lease.title = `last activity ${new Date(info.last_activity_at).toLocaleString()}; closed as abandoned at ${new Date(info.lease_expires_at).toLocaleString()} unless renewed`;
}

async function refreshHead() {
  if (!state.stream) return;
  try {
    const stream = state.stream;
    const info = await state.client.getStream(stream);
    if (stream !== state.stream) return;
    $("stream-head").textContent = info.head;
    state.pace.createdAt = Date.parse(info.created_at);
    if (info.updated_at) state.pace.lastEvent = Math.max(state.pace.lastEvent ?? 0, Date.parse(info.updated_at));
    showLease(info);
    if (info.closed) {
      setClosed(true);
      setStreamStatus("closed", "closed");
    }
    showPace();
  } catch (err) {
    if (err.code === "stream_not_found") $("stream-head").textContent = "0";
  }
}

/** The answer to the stop this console sent: whether it took effect. */
function noteStopAnswer(ev) {
  const a = stopAnswer(ev);
  if (!a || a.stopSeq !== state.pendingStop) return;
  state.pendingStop = null;
  if (a.outcome === "stopped") showBanner(`The agent stopped (stop seq ${a.stopSeq}, answered at seq ${ev.seq}).`, "info");
  else showBanner(`The agent refused to stop${a.reason !== undefined ? `: ${typeof a.reason === "string" ? a.reason : JSON.stringify(a.reason)}` : ""} (stop seq ${a.stopSeq}).`, "error");
}

// ---- input requests ----------------------------------------------------------------------

function clearInputs() {
  state.inputs.clear();
  $("input-cards").replaceChildren();
  $("inputs").hidden = true;
}

async function loadInputs(stream) {
  try {
    const res = await state.client.openInputs(stream);
    if (stream !== state.stream) return;
    for (const req of res.inputs ?? []) addInput(stream, req);
  } catch (err) {
    // Requests also arrive as input.requested events; a listing we may not read is no reason
    // to interrupt the person, unless it is about the token.
    if (err.status === 401) report(err, "listing input requests");
  }
}

function addInput(stream, req) {
  if (!req?.request_id || state.inputs.has(req.request_id)) return;
  if (req.status && req.status !== "open") return;
  const card = document.createElement("article");
  card.className = "input-card";
  card.dataset.requestId = req.request_id;
  card.dataset.status = "open";
  const head = document.createElement("header");
  const prompt = document.createElement("strong");
  prompt.textContent = typeof req.prompt === "string" ? req.prompt : JSON.stringify(req.prompt ?? "Input requested");
  const meta = document.createElement("span");
  meta.className = "muted";
  meta.textContent = `${req.request_id}${req.expires_at ? " · expires " + new Date(req.expires_at).toLocaleTimeString() : ""}`;
  head.append(prompt, meta);
  const form = buildForm(req.schema, async (value) => {
    await state.client.answer(stream, req.request_id, value);
    card.classList.add("sent");
  });
  card.append(head, form);
  state.inputs.set(req.request_id, card);
  $("input-cards").append(card);
  $("inputs").hidden = false;
}

/**
 * A request was answered or expired: its card stays, showing the outcome and when (the event's
 * time) in place of the form, so what was decided stays in view.
 */
function resolveInput(ev) {
  const requestId = ev.data?.request_id;
  const card = state.inputs.get(requestId);
  if (!card || card.dataset.status !== "open") return;
  const answered = ev.type === "input.answered";
  card.dataset.status = answered ? "answered" : "expired";
  card.classList.add(answered ? "answered" : "expired");
  const outcome = document.createElement("div");
  outcome.className = "outcome";
  const label = document.createElement("span");
  label.className = `pill ${answered ? "live" : "closed"}`;
  label.textContent = answered ? "answered" : "expired";
  const when = document.createElement("span");
  when.className = "muted";
  when.textContent = `${new Date(ev.time).toLocaleTimeString()} · seq ${ev.seq}`;
  when.title = ev.time;
  outcome.append(label, when);
  if (answered) {
    const value = document.createElement("pre");
    value.className = "answer";
    value.textContent = JSON.stringify(ev.data.data, null, 2);
    outcome.append(value);
  }
  card.querySelector("form")?.replaceWith(outcome);
  if (!answered) showBanner(`Input request ${requestId} expired.`, "info");
}

// ---- connection and server stats ---------------------------------------------------------

function showConnection() {
  const s = state.client.stats();
  $("conn-transport").textContent = s.transport === "ws" ? "WebSocket" : "SSE";
  $("conn-state").textContent = s.state;
  $("conn-reconnects").textContent = s.reconnects;
  $("conn-events").textContent = s.eventsReceived;
  $("conn-dot").className = `dot ${s.state}`;
  $("conn").title = `connection ${s.connectionId ?? "–"}; fallbacks to SSE: ${s.fallbacks}; last error: ${s.lastError ?? "none"}`;
}

async function refreshServerStats() {
  const dl = $("server-stats");
  const row = (k, v) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    return [dt, dd];
  };
  try {
    const s = await state.client.serverStats();
    dl.replaceChildren(
      ...row("node", s.node_id),
      ...row("version", `${s.version ?? "?"} (${s.commit ?? "?"})`),
      ...row("uptime", `${s.uptime_s} s`),
      ...row("streams", s.streams ?? "–"),
      ...row("events", s.events ?? "–"),
      ...row("open inputs", s.open_input_requests ?? "–"),
      ...row("leased streams", s.leased_streams ?? "–"),
      ...row("webhooks", s.webhooks ? `${s.webhooks.registered}${s.webhooks.failing_streams ? ` (${s.webhooks.failing_streams} failing)` : ""}` : "–"),
      ...row("SSE conns", s.connections?.sse ?? 0),
      ...row("WS conns", s.connections?.ws ?? 0),
      ...row("subscriptions", s.subscriptions),
      ...row("live streams", s.live_streams),
      ...row("followers", s.presence?.followers ?? "–"),
    );
  } catch (err) {
    const text = err.status === 401 || err.status === 403 ? "needs an admin token" : err.message;
    dl.replaceChildren(...row("stats", text));
  }
}

// ---- wiring ------------------------------------------------------------------------------

function streamFromHash() {
  const h = location.hash.slice(1);
  if (!h) return null;
  try {
    return decodeURIComponent(h);
  } catch {
    return null;
  }
}

function start() {
  const token = storedToken();
  state.client = new TailcastClient({ url: location.origin, token });
  $("token").value = token;
  showTokenState();
  state.client.on("status", (s) => {
    showConnection();
    // The server's connection counts just changed by ours.
    if (s.state === "open") refreshServerStats();
  });
  state.client.on("fallback", (f) => {
    showBanner(`WebSocket unavailable (${f.reason}); following over Server-Sent Events.`, "info");
  });
  state.client.on("error", (err) => {
    if (err.status === 401 || err.code === "unauthorized") report(err, "connecting");
  });

  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useToken($("token").value.trim());
  });
  $("token-clear").addEventListener("click", () => {
    $("token").value = "";
    useToken("");
  });

  let filterTimer;
  $("filter").addEventListener("input", () => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => refreshStreams(), 200);
  });
  $("hide-closed").addEventListener("change", () => refreshStreams());
  $("refresh").addEventListener("click", () => refreshStreams());
  $("more").addEventListener("click", () => refreshStreams({ append: true }));

  $("replay-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const from = Number($("replay-seq").value);
    if (!Number.isInteger(from) || from < 1) {
      showBanner("Replay needs a seq of 1 or more.");
      return;
    }
    clearBanner();
    watch(state.stream, { after: from - 1 });
  });
  $("tail-btn").addEventListener("click", () => watch(state.stream, { from: "now" }));

  $("stop-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (state.closed) return;
    const btn = $("stop-btn");
    btn.disabled = true;
    try {
      const ack = await state.client.stop(state.stream, $("stop-reason").value.trim() || undefined);
      state.pendingStop = ack?.first_seq ?? null;
      showBanner(`Stop sent to ${state.stream}${ack?.first_seq ? ` (seq ${ack.first_seq})` : ""}; waiting for the agent to answer.`, "info");
    } catch (err) {
      if (err.code === "stream_closed") setClosed(true);
      else report(err, `sending stop to ${state.stream}`);
    } finally {
      btn.disabled = state.closed;
    }
  });

  $("close-btn").addEventListener("click", async () => {
    const stream = state.stream;
    if (!stream || state.closed) return;
    if (!confirm(`Close ${stream}? It takes no more events; readers see it end. This cannot be undone.`)) return;
    try {
      await state.client.closeStream(stream, "closed from the console");
      setClosed(true);
      showBanner(`Closed ${stream}.`, "info");
      refreshStreams();
    } catch (err) {
      report(err, `closing ${stream}`);
    }
  });

  $("delete-btn").addEventListener("click", async () => {
    const stream = state.stream;
    if (!stream) return;
    if (!confirm(`Delete ${stream} and all its events? This cannot be undone.`)) return;
    try {
      await state.client.request("DELETE", `/v1/streams/${encodeURIComponent(stream)}`);
      setClosed(true);
      setStreamStatus("deleted", "closed");
      showBanner(`Deleted ${stream}.`, "info");
      refreshStreams();
    } catch (err) {
      report(err, `deleting ${stream}`);
    }
  });

  window.addEventListener("hashchange", () => {
    const s = streamFromHash();
    if (s && s !== state.stream) watch(s);
  });

  refreshStreams();
  refreshServerStats();
  const s = streamFromHash();
  if (s) watch(s);
  showConnection();
  setInterval(() => {
    showConnection();
    if (state.stream) showPace();
  }, 1000);
  setInterval(refreshServerStats, 5000);
  setInterval(() => {
    refreshHead();
    if (!document.hidden) refreshStreams();
  }, 5000);
  refreshHead();
  document.body.dataset.ready = "1";
}

start();
