// tailcast.js: a dependency-free client for tailcast streams, for browsers (and any runtime
// with fetch, WebSocket and EventSource globals, or ones passed in).
//
// It keeps one multiplexed WebSocket for every subscription and resumes each stream from the
// cursor it holds after any disconnect, so a subscriber sees every event exactly once, in
// order. Reconnects back off exponentially with jitter. When the WebSocket cannot be opened
// while plain HTTP still works (a proxy that refuses upgrades), it falls back to one
// EventSource per stream, with the same cursor and backoff rules.

/**
 * @typedef {object} Envelope An event as stored and delivered.
 * @property {string} stream
 * @property {number} seq
 * @property {string} type
 * @property {any} data
 * @property {string} [id]
 * @property {string} [key]
 * @property {true} [append] The event extends the message its key names.
 * @property {number} [folded] Compacted reads: this event stands for that many events of the
 *   log (one message's run), with the last one's seq and the merged data.
 * @property {string} time
 */

/**
 * @typedef {object} SubscribeOptions
 * @property {number} [after] Cursor: deliver events with seq > after (default 0: everything).
 * @property {"now"|"snapshot"} [from] Start at the head, or with the latest event per key.
 * @property {string[]} [types] Only these event types.
 * @property {boolean} [compact] Compacted follow: the catch-up comes with each run of appends
 *   to a message folded into one event (`folded`), then the live tail event by event. Every
 *   seq stays an exact cursor, so reconnects resume (compacted) where they left off. Feed
 *   the events to a {@link Messages} to hold whole messages either way.
 * @property {(notice: object) => void} [onNotice] gap / reset / deleted notices.
 * @property {(err: TailcastError) => void} [onError] The subscription was refused (it ends).
 * @property {(reason: "closed"|"deleted"|"unsubscribed") => void} [onEnd] No more events will come.
 */

/**
 * @typedef {object} BackoffOptions
 * @property {number} [initialMs=250] First delay.
 * @property {number} [maxMs=15000] Largest delay.
 * @property {number} [factor=2] Growth per failed attempt.
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} [url] Base URL of the server (default: the page's origin).
 * @property {string} [wsUrl] WebSocket URL (default: derived from url + "/v1/ws").
 * @property {string} [token] Bearer token.
 * @property {"auto"|"ws"|"sse"} [transport="auto"] "auto": WebSocket, falling back to SSE.
 * @property {BackoffOptions} [backoff]
 * @property {number} [wsOpenTimeoutMs=5000] A WebSocket not open by then counts as failed.
 * @property {number} [wsFailuresBeforeFallback=2] Consecutive failed WebSocket opens, while
 *   HTTP answers, before falling back to SSE.
 * @property {typeof fetch} [fetch]
 * @property {typeof WebSocket} [WebSocket]
 * @property {typeof EventSource} [EventSource]
 */

/** An error from the server (problem+json or WebSocket `error` op) or from the client. */
export class TailcastError extends Error {
  /**
   * @param {string} code Stable machine-readable code (e.g. "unauthorized", "seq_conflict").
   * @param {string} message
   * @param {number} [status] HTTP status, when there was one.
   * @param {object} [problem] The full problem document or error op.
   */
  constructor(code, message, status, problem) {
    super(message);
    this.name = "TailcastError";
    this.code = code;
    this.status = status;
    this.problem = problem;
  }
}

const RESERVED_END = "stream.closed";

/** Codes that mean "try again later" rather than "no". */
const TRANSIENT = new Set([
  "network",
  "disconnected",
  "unavailable",
  "shutting_down",
  "internal",
  "rate_limited",
  "request_timeout",
  "too_many_connections",
]);

/** Whether an error is worth retrying (the server is busy, restarting or away). */
export function isTransient(err) {
  return TRANSIENT.has(err?.code) || (typeof err?.status === "number" && err.status >= 500);
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential, capped, with "equal
 * jitter" (half fixed, half random) so a crowd of clients dropped together does not come back
 * in lockstep, yet none retries immediately.
 * @param {number} attempt
 * @param {BackoffOptions} [opts]
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, opts = {}, random = Math.random) {
  const initial = opts.initialMs ?? 250;
  const max = opts.maxMs ?? 15000;
  const factor = opts.factor ?? 2;
  const cap = Math.min(max, initial * Math.pow(factor, attempt));
  return Math.round(cap / 2 + random() * (cap / 2));
}

/**
 * A fetch that failed without an answer: the server is away (transient `network`), or, in a
 * browser, the server answered but CORS refused the page's origin (terminal `cors_refused`).
 * Browsers give both as the same TypeError; a `no-cors` request tells them apart: it gets an
 * opaque answer from a server that is up, and fails like the first from one that is down.
 */
export async function classifyFetchFailure(fetchFn, url, err) {
  const crossOrigin = typeof location !== "undefined" && typeof document !== "undefined" && new URL(url, location.href).origin !== location.origin;
  if (crossOrigin) {
    try {
      await fetchFn(url, { mode: "no-cors", cache: "no-store" });
      return new TailcastError(
        "cors_refused",
        `${new URL(url).origin} answered but refused this page's origin ${location.origin} (start tailcast with --cors-origins ${location.origin})`,
      );
    } catch {
      // Down as well: transient.
    }
  }
  return new TailcastError("network", `cannot reach ${url}: ${err?.message ?? err}`);
}

class Subscription {
  constructor(client, stream, opts, onEvent) {
    this.client = client;
    this.stream = stream;
    this.opts = opts;
    this.onEvent = onEvent;
    /** @type {number|null} seq of the last event delivered (null until resolved). */
    this.cursor = typeof opts.after === "number" ? opts.after : opts.from ? null : 0;
    this.head = null;
    this.ended = false;
    this.es = null;
    this.attempt = 0;
    this.timer = null;
    this.wsRef = null;
  }
}

/** Client for one tailcast server. */
export class TailcastClient {
  /** @param {ClientOptions} [options] */
  constructor(options = {}) {
    const origin = typeof location !== "undefined" ? location.origin : undefined;
    this.url = (options.url ?? origin ?? "").replace(/\/+$/, "");
    if (!this.url) throw new TypeError("TailcastClient: url is required outside a browser");
    this.wsUrl = options.wsUrl ?? this.url.replace(/^http/, "ws") + "/v1/ws";
    this.token = options.token || null;
    this.backoff = options.backoff ?? {};
    this.wsOpenTimeoutMs = options.wsOpenTimeoutMs ?? 5000;
    this.wsFailuresBeforeFallback = options.wsFailuresBeforeFallback ?? 2;
    this._fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._EventSource = options.EventSource ?? globalThis.EventSource;
    const want = options.transport ?? "auto";
    /** "ws" or "sse": what subscriptions use now. */
    this.transport = want === "sse" || !this._WebSocket ? "sse" : "ws";
    this._fallback = want === "auto";
    /** @type {Map<string, Subscription>} */
    this._subs = new Map();
    this._listeners = new Map();
    this._pending = new Map();
    this._nextRef = 1;
    this._ws = null;
    this._wsState = "idle"; // idle | connecting | open | waiting | stopped
    this._wsAttempt = 0;
    this._wsBlocked = 0;
    this._wsTimer = null;
    this._heartbeat = null;
    this._lastFrameAt = 0;
    this._closed = false;
    this._stats = {
      connectionId: null,
      connects: 0,
      reconnects: 0,
      fallbacks: 0,
      eventsReceived: 0,
      duplicatesDropped: 0,
      lastError: null,
      lastEventAt: null,
    };
  }

  // ---- subscriptions -------------------------------------------------------------------

  /**
   * Follows `stream`, calling `onEvent(envelope)` once per event, in seq order, across any
   * number of reconnects.
   * @param {string} stream
   * @param {SubscribeOptions} [opts]
   * @param {(event: Envelope) => void} onEvent
   */
  subscribe(stream, opts, onEvent) {
    if (typeof opts === "function") [opts, onEvent] = [{}, opts];
    opts = opts ?? {};
    if (this._closed) throw new TailcastError("client_closed", "this client was closed");
    if (this._subs.has(stream)) {
      throw new TailcastError("already_subscribed", `already subscribed to ${stream}`);
    }
    const sub = new Subscription(this, stream, opts, onEvent);
    this._subs.set(stream, sub);
    this._start(sub);
    const client = this;
    return {
      stream,
      /** seq of the last event delivered to onEvent. */
      get cursor() {
        return sub.cursor;
      },
      get ended() {
        return sub.ended;
      },
      unsubscribe() {
        client._unsubscribe(sub, "unsubscribed");
      },
    };
  }

  /** The cursor of every stream this client follows: `{stream: seq}`. */
  cursors() {
    const out = {};
    for (const [name, sub] of this._subs) out[name] = sub.cursor;
    return out;
  }

  /** Connection statistics for display. */
  stats() {
    return {
      transport: this.transport,
      state: this.transport === "ws" ? this._wsState : this._sseState(),
      subscriptions: this._subs.size,
      ...this._stats,
    };
  }

  /**
   * Listens to client happenings: "status" (connection state changed: {transport, state,
   * attempt?, delayMs?}), "fallback" (now using SSE), "error" (TailcastError).
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name).delete(fn);
  }

  /** Uses another token from now on: every connection is re-made with it. */
  setToken(token) {
    this.token = token || null;
    this._wsBlocked = 0;
    if (this.transport === "ws") {
      if (this._ws) this._dropWs("token changed");
      this._wsAttempt = 0;
      this._ensureWs();
    }
    for (const sub of this._subs.values()) {
      if (this.transport === "sse" && !sub.ended) {
        this._closeEs(sub);
        sub.attempt = 0;
        this._openEs(sub);
      }
    }
  }

  /** Closes every connection and ends every subscription. */
  close() {
    this._closed = true;
    for (const sub of [...this._subs.values()]) this._unsubscribe(sub, "unsubscribed");
    clearTimeout(this._wsTimer);
    if (this._ws) this._dropWs("client closed");
    this._wsState = "stopped";
  }

  // ---- producer and interactive operations ---------------------------------------------

  /**
   * Appends events (one object or an array). Over the WebSocket when it is open, else REST.
   * @returns {Promise<{stream:string, first_seq:number, last_seq:number, events:object[]}>}
   */
  async publish(stream, events, { expectedSeq } = {}) {
    const list = Array.isArray(events) ? events : [events];
    if (this._wsOpen()) {
      const op = { op: "publish", stream, events: list };
      if (expectedSeq !== undefined) op.expected_seq = expectedSeq;
      return this._wsCall(op);
    }
    const q = expectedSeq !== undefined ? `?expected_seq=${expectedSeq}` : "";
    return this.request("POST", `/v1/streams/${enc(stream)}/events${q}`, list);
  }

  /** Answers an open input request. */
  async answer(stream, requestId, data) {
    if (this._wsOpen()) {
      return this._wsCall({ op: "input", stream, request_id: requestId, data });
    }
    return this.request(
      "POST",
      `/v1/streams/${enc(stream)}/inputs/${enc(requestId)}`,
      { data },
    );
  }

  /** Asks the producer to stop: appends control.stop (data `{"reason": …}`). */
  async stop(stream, reason) {
    const op = { op: "stop", stream };
    if (reason !== undefined && reason !== "") op.reason = reason;
    if (this._wsOpen()) return this._wsCall(op);
    return this.request("POST", `/v1/streams/${enc(stream)}/stop`, op.reason === undefined ? {} : { reason: op.reason });
  }

  // ---- stop acknowledgement (the agent's side, then the sender's) ------------------------

  /**
   * The agent has stopped: appends `control.stopped` `{stop_seq, ...data}` answering the
   * `control.stop` at `stopSeq`.
   */
  stopped(stream, stopSeq, data = {}) {
    return this.publish(stream, { type: "control.stopped", data: { ...data, stop_seq: stopSeq } });
  }

  /** The agent will not stop: appends `control.stop_refused` `{stop_seq, reason}`. */
  refuseStop(stream, stopSeq, reason) {
    const data = { stop_seq: stopSeq };
    if (reason !== undefined) data.reason = reason;
    return this.publish(stream, { type: "control.stop_refused", data });
  }

  /**
   * Whether the stop at `stopSeq` took effect: reads the stream after it (REST, so it works
   * beside a subscription to the same stream) until the agent answers, the stream closes, or
   * `timeoutMs` passes. Resolves to `{outcome: "stopped"|"refused"|"closed"|"timeout", event}`
   * (`event`: the answer or the `stream.closed`; a stream closed as abandoned by its lease has
   * `event.data.reason === "abandoned"`).
   */
  async waitForStopOutcome(stream, stopSeq, { timeoutMs = 30000, pollMs = 250 } = {}) {
    const deadline = Date.now() + timeoutMs;
    let after = stopSeq;
    for (;;) {
      const page = await this.readEvents(stream, { after, limit: 1000 });
      for (const ev of page.events) {
        const d = ev.data && typeof ev.data === "object" ? ev.data : {};
        if ((ev.type === "control.stopped" || ev.type === "control.stop_refused") && d.stop_seq === stopSeq) {
          return { outcome: ev.type === "control.stopped" ? "stopped" : "refused", event: ev };
        }
        if (ev.type === "stream.closed") return { outcome: "closed", event: ev };
      }
      after = page.next_after;
      if (page.events.length > 0) continue;
      if (Date.now() >= deadline) return { outcome: "timeout", event: null };
      await new Promise((r) => setTimeout(r, Math.min(pollMs, Math.max(0, deadline - Date.now()))));
    }
  }

  // ---- leases (the producer's side) -------------------------------------------------------

  /** Sets the stream's lease in seconds (null or 0 removes it): `PATCH /v1/streams/{stream}`. */
  setLease(stream, leaseS) {
    return this.request("PATCH", `/v1/streams/${enc(stream)}`, { lease_s: leaseS });
  }

  /** Renews the stream's lease without appending: `POST /v1/streams/{stream}/heartbeat`. */
  heartbeat(stream) {
    return this.request("POST", `/v1/streams/${enc(stream)}/heartbeat`);
  }

  // ---- REST ------------------------------------------------------------------------------

  /** Lists streams: `{streams, next_after_name}`. */
  listStreams({ prefix, limit, afterName } = {}) {
    return this.request("GET", "/v1/streams" + query({ prefix, limit, after_name: afterName }));
  }
  getStream(stream) {
    return this.request("GET", `/v1/streams/${enc(stream)}`);
  }
  /** One page of history: `{events, next_after, head, closed}` (`compact`: runs folded). */
  readEvents(stream, { after = 0, limit, since, compact } = {}) {
    return this.request(
      "GET",
      `/v1/streams/${enc(stream)}/events` + query({ after, limit, since, compact: compact ? 1 : undefined }),
    );
  }
  snapshot(stream) {
    return this.request("GET", `/v1/streams/${enc(stream)}/snapshot`);
  }
  /** Who follows the stream now, on every node: `{stream, count, members}`. */
  presence(stream, { limit } = {}) {
    return this.request("GET", `/v1/streams/${enc(stream)}/presence` + query({ limit }));
  }
  closeStream(stream, reason) {
    return this.request("POST", `/v1/streams/${enc(stream)}/close`, reason === undefined ? undefined : { reason });
  }
  /** Input requests still waiting for an answer: `{inputs: [...]}`. */
  openInputs(stream) {
    return this.request("GET", `/v1/streams/${enc(stream)}/inputs?status=open`);
  }
  /** Creates an input request (producer side). */
  requestInput(stream, request) {
    return this.request("POST", `/v1/streams/${enc(stream)}/inputs`, request);
  }
  /** Server statistics (admin): `{node_id, uptime_s, connections, subscriptions, live_streams}`. */
  serverStats() {
    return this.request("GET", "/v1/stats");
  }

  /** One REST call with this client's token; problem+json becomes a TailcastError. */
  async request(method, path, body) {
    const headers = { accept: "application/json" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let res;
    try {
      res = await this._fetch(this.url + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw await classifyFetchFailure(this._fetch, this.url + path, e);
    }
    if (res.status === 204) return null;
    const text = await res.text();
    let doc = null;
    try {
      doc = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON (a proxy's error page): reported below by status.
    }
    if (!res.ok) {
      const code = doc?.code ?? `http_${res.status}`;
      const msg = doc?.detail || doc?.title || `${method} ${path}: HTTP ${res.status}`;
      throw new TailcastError(code, msg, res.status, doc ?? undefined);
    }
    return doc;
  }

  // ---- internals: shared ----------------------------------------------------------------

  _emit(name, value) {
    for (const fn of this._listeners.get(name) ?? []) {
      try {
        fn(value);
      } catch (e) {
        console.error("tailcast listener failed", e);
      }
    }
  }

  async _start(sub) {
    if (sub.cursor === null) {
      try {
        await this._resolveStart(sub);
      } catch (e) {
        if (isTransient(e)) {
          // The server is away or busy: try again later, as a reconnect would.
          sub.timer = setTimeout(() => this._start(sub), backoffDelay(sub.attempt++, this.backoff));
          return;
        }
        this._fail(sub, e);
        return;
      }
    }
    if (sub.ended) return;
    if (this.transport === "ws") {
      if (this._wsState === "open") this._wsSubscribe(sub);
      else this._ensureWs();
    } else {
      this._openEs(sub);
    }
  }

  /**
   * Turns `from` into an exact cursor before the first subscription, so that every later
   * (re)subscription, on either transport, is a plain `after=cursor` and nothing appended
   * while disconnected is skipped.
   */
  async _resolveStart(sub) {
    if (sub.opts.from === "snapshot") {
      const snap = await this.request("GET", `/v1/streams/${enc(sub.stream)}/snapshot`);
      if (sub.ended) return;
      sub.cursor = snap.at ?? 0;
      for (const ev of snap.events ?? []) this._deliverUnordered(sub, ev);
    } else {
      try {
        const info = await this.getStream(sub.stream);
        sub.cursor = info.head;
      } catch (e) {
        if (e.code !== "stream_not_found") throw e;
        sub.cursor = 0;
      }
    }
  }

  /** Delivers an event if it is new for this subscription; the single place cursors move. */
  _deliver(sub, ev) {
    if (sub.ended) return;
    if (typeof ev.seq !== "number" || ev.seq <= sub.cursor) {
      this._stats.duplicatesDropped++;
      return;
    }
    sub.cursor = ev.seq;
    if (sub.head === null || ev.seq > sub.head) sub.head = ev.seq;
    this._stats.eventsReceived++;
    this._stats.lastEventAt = Date.now();
    this._callOnEvent(sub, ev);
    if (ev.type === RESERVED_END) this._unsubscribe(sub, "closed");
  }

  /** Snapshot events come by key, not by seq; the cursor is already the snapshot's `at`. */
  _deliverUnordered(sub, ev) {
    this._stats.eventsReceived++;
    this._callOnEvent(sub, ev);
  }

  _callOnEvent(sub, ev) {
    try {
      sub.onEvent?.(ev);
    } catch (e) {
      console.error("tailcast onEvent failed", e);
    }
  }

  _notice(sub, notice) {
    if (notice.notice === "reset" && typeof notice.head === "number") {
      // The stream is shorter than our cursor (it was deleted and re-created): follow it anew.
      sub.cursor = notice.head;
    }
    try {
      sub.opts.onNotice?.(notice);
    } catch (e) {
      console.error("tailcast onNotice failed", e);
    }
    if (notice.notice === "deleted") this._unsubscribe(sub, "deleted");
  }

  _fail(sub, err) {
    this._stats.lastError = err.message;
    this._emit("error", err);
    try {
      sub.opts.onError?.(err);
    } catch (e) {
      console.error("tailcast onError failed", e);
    }
    this._unsubscribe(sub, null);
  }

  _unsubscribe(sub, reason) {
    if (sub.ended) return;
    sub.ended = true;
    clearTimeout(sub.timer);
    this._subs.delete(sub.stream);
    this._closeEs(sub);
    if (this._wsOpen()) {
      // The server may already have ended it (after stream.closed): an error then is moot.
      this._wsCall({ op: "unsubscribe", stream: sub.stream }).catch(() => {});
    }
    if (reason) {
      try {
        sub.opts.onEnd?.(reason);
      } catch (e) {
        console.error("tailcast onEnd failed", e);
      }
    }
  }

  /**
   * After a failed connection: is the server down (retry), refusing us (stop), or up while
   * the connection failed anyway (the WebSocket is blocked on the way)? Probes with the
   * same credentials, on a stream we follow when there is one.
   * @returns {Promise<{state: "down"|"up"|"refused", error?: TailcastError, info?: object}>}
   */
  async _probe(stream) {
    try {
      const info = stream
        ? await this.getStream(stream)
        : await this.request("GET", "/healthz");
      return { state: "up", info };
    } catch (e) {
      if (e.status === 401 || e.status === 403 || e.code === "cors_refused") return { state: "refused", error: e };
      if (e.code === "network" || e.status >= 500) return { state: "down" };
      return { state: "up" };
    }
  }

  // ---- internals: WebSocket -------------------------------------------------------------

  _wsOpen() {
    return this.transport === "ws" && this._wsState === "open" && this._ws?.readyState === 1;
  }

  _setWsState(state, extra = {}) {
    this._wsState = state;
    this._emit("status", { transport: "ws", state, ...extra });
  }

  _ensureWs() {
    if (this._closed || this.transport !== "ws") return;
    if (this._wsState === "connecting" || this._wsState === "open" || this._wsState === "waiting") return;
    this._connectWs();
  }

  _connectWs() {
    this._setWsState("connecting", { attempt: this._wsAttempt });
    let ws;
    try {
      ws = new this._WebSocket(this._withToken(this.wsUrl));
    } catch (e) {
      this._wsFailed(false, e.message);
      return;
    }
    this._ws = ws;
    let opened = false;
    const openTimer = setTimeout(() => {
      if (!opened && this._ws === ws) {
        ws.close();
        this._wsFailed(false, "WebSocket did not open in time");
      }
    }, this.wsOpenTimeoutMs);
    ws.onopen = () => {
      opened = true;
      clearTimeout(openTimer);
      this._lastFrameAt = Date.now();
    };
    ws.onmessage = (m) => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      let msg;
      try {
        msg = JSON.parse(m.data);
      } catch {
        return;
      }
      this._onWsMessage(msg);
    };
    ws.onclose = (e) => {
      clearTimeout(openTimer);
      if (this._ws !== ws) return;
      this._wsFailed(opened, `WebSocket closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
    };
    // onerror is always followed by onclose, where the failure is handled once.
    ws.onerror = () => {};
  }

  _onWsMessage(msg) {
    switch (msg.op) {
      case "welcome": {
        const reconnect = this._stats.connects > 0;
        this._stats.connects++;
        if (reconnect) this._stats.reconnects++;
        this._stats.connectionId = msg.connection_id ?? null;
        this._wsAttempt = 0;
        this._wsBlocked = 0;
        this._setWsState("open", { connectionId: msg.connection_id, reconnect });
        this._startHeartbeat(msg.heartbeat_ms);
        for (const sub of this._subs.values()) {
          if (sub.cursor !== null && !sub.ended) this._wsSubscribe(sub);
        }
        break;
      }
      case "event": {
        const sub = this._subs.get(msg.stream);
        if (!sub) return;
        const { op: _op, ...ev } = msg;
        this._deliver(sub, ev);
        break;
      }
      case "subscribed": {
        const sub = this._subs.get(msg.stream);
        if (sub && typeof msg.head === "number") sub.head = Math.max(sub.head ?? 0, msg.head);
        if (sub) sub.attempt = 0;
        this._settle(msg.ref, msg);
        break;
      }
      case "notice": {
        const sub = this._subs.get(msg.stream);
        if (sub) {
          const { op: _op, ...notice } = msg;
          this._notice(sub, notice);
        }
        break;
      }
      case "unsubscribed": {
        // With a ref it answers our unsubscribe; without, the server ended the subscription.
        if (msg.ref !== undefined) {
          this._settle(msg.ref, msg);
          break;
        }
        const sub = this._subs.get(msg.stream);
        if (sub) this._serverEnded(sub, msg);
        break;
      }
      case "error": {
        const err = new TailcastError(msg.code ?? "error", msg.message ?? "error", undefined, msg);
        if (msg.ref !== undefined && this._pending.has(msg.ref)) {
          this._settle(msg.ref, null, err);
          return;
        }
        this._stats.lastError = err.message;
        this._emit("error", err);
        break;
      }
      default:
        this._settle(msg.ref, msg);
    }
  }

  /** The server ended a subscription on its own: finished, refused, or failed (retry). */
  _serverEnded(sub, msg) {
    if (msg.reason === "closed" || msg.reason === "deleted") {
      this._unsubscribe(sub, msg.reason);
      return;
    }
    const err = new TailcastError(msg.code ?? "internal", msg.message ?? "the subscription failed", undefined, msg);
    this._retrySubscribe(sub, err);
  }

  /** Subscribes again after a backoff delay if `err` is transient; else the subscription fails. */
  _retrySubscribe(sub, err) {
    if (!isTransient(err)) {
      this._fail(sub, err);
      return;
    }
    this._stats.lastError = err.message;
    const delayMs = backoffDelay(sub.attempt++, this.backoff);
    clearTimeout(sub.timer);
    sub.timer = setTimeout(() => {
      // If the connection dropped meanwhile, the next welcome subscribes it.
      if (!sub.ended && this._wsOpen()) this._wsSubscribe(sub);
    }, delayMs);
  }

  _wsSubscribe(sub) {
    const op = { op: "subscribe", stream: sub.stream, after: sub.cursor };
    if (sub.opts.types?.length) op.types = sub.opts.types;
    if (sub.opts.compact) op.compact = true;
    this._wsCall(op).catch((err) => {
      // A dropped connection resubscribes on reconnect; a busy server, after a delay; a
      // refusal ends the subscription.
      if (err.code === "disconnected" || err.code === "already_subscribed") return;
      this._retrySubscribe(sub, err);
    });
  }

  _wsSend(op) {
    try {
      this._ws.send(JSON.stringify(op));
      return true;
    } catch {
      return false;
    }
  }

  _wsCall(op) {
    return new Promise((resolve, reject) => {
      const ref = `c${this._nextRef++}`;
      this._pending.set(ref, { resolve, reject });
      if (!this._wsSend({ ...op, ref })) {
        this._pending.delete(ref);
        reject(new TailcastError("disconnected", "the WebSocket is not connected"));
      }
    });
  }

  _settle(ref, value, err) {
    const p = ref === undefined ? undefined : this._pending.get(ref);
    if (!p) return;
    this._pending.delete(ref);
    if (err) p.reject(err);
    else p.resolve(value);
  }

  _startHeartbeat(ms) {
    clearInterval(this._heartbeat);
    const every = Math.max(1000, Number(ms) || 30000);
    const ws = this._ws;
    // Browsers answer the server's Ping frames without telling us, so liveness is checked
    // with our own ping op: a connection silent for two periods is half-open; drop it.
    this._heartbeat = setInterval(() => {
      if (this._ws !== ws) return clearInterval(this._heartbeat);
      if (Date.now() - this._lastFrameAt > 2 * every) {
        this._dropWs("no answer to heartbeats");
        this._wsFailed(true, "heartbeat timeout");
        return;
      }
      this._wsSend({ op: "ping" });
    }, every);
  }

  _dropWs(reason) {
    const ws = this._ws;
    this._ws = null;
    clearInterval(this._heartbeat);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000, reason);
      } catch {
        // Already closing.
      }
    }
    this._wsState = "idle";
    for (const [ref, p] of this._pending) {
      this._pending.delete(ref);
      p.reject(new TailcastError("disconnected", `the WebSocket closed: ${reason}`));
    }
  }

  /** The connection failed or dropped: decide between retrying, falling back, or stopping. */
  async _wsFailed(wasOpen, reason) {
    this._dropWs(reason);
    this._stats.lastError = reason;
    if (this._closed) return;
    this._setWsState("waiting", { reason });
    if (!wasOpen) {
      const probe = await this._probe(this._subs.keys().next().value);
      if (this._closed || this.transport !== "ws") return;
      if (probe.state === "refused") {
        this._wsState = "stopped";
        for (const sub of [...this._subs.values()]) this._fail(sub, probe.error);
        this._setWsState("stopped", { reason: probe.error.message });
        return;
      }
      if (probe.state === "up" && this._fallback) {
        this._wsBlocked++;
        if (this._wsBlocked >= this.wsFailuresBeforeFallback) {
          this._fallBackToSse(reason);
          return;
        }
      }
    }
    const delayMs = backoffDelay(this._wsAttempt++, this.backoff);
    this._emit("status", { transport: "ws", state: "waiting", attempt: this._wsAttempt, delayMs });
    this._wsTimer = setTimeout(() => {
      this._wsState = "idle";
      if (this._subs.size || this._stats.connects) this._ensureWs();
    }, delayMs);
  }

  _fallBackToSse(reason) {
    this.transport = "sse";
    this._wsState = "stopped";
    this._stats.fallbacks++;
    this._emit("fallback", { reason });
    this._emit("status", { transport: "sse", state: this._sseState() });
    for (const sub of this._subs.values()) {
      if (!sub.ended && sub.cursor !== null) this._openEs(sub);
    }
  }

  _withToken(url) {
    if (!this.token) return url;
    return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this.token);
  }

  // ---- internals: SSE -------------------------------------------------------------------

  _sseState() {
    const subs = [...this._subs.values()];
    if (!subs.length) return "idle";
    return subs.every((s) => s.es?.readyState === 1) ? "open" : "connecting";
  }

  _openEs(sub) {
    if (sub.ended || this._closed) return;
    if (!this._EventSource) {
      this._fail(sub, new TailcastError("sse_unavailable", "no EventSource in this runtime"));
      return;
    }
    const params = { after: sub.cursor, token: this.token ?? undefined };
    if (sub.opts.types?.length) params.types = sub.opts.types.join(",");
    if (sub.opts.compact) params.compact = 1;
    const es = new this._EventSource(`${this.url}/v1/streams/${enc(sub.stream)}/sse${query(params)}`);
    sub.es = es;
    es.onopen = () => {
      sub.attempt = 0;
      this._emit("status", { transport: "sse", state: this._sseState(), stream: sub.stream });
    };
    es.onmessage = (m) => {
      let ev;
      try {
        ev = JSON.parse(m.data);
      } catch {
        return;
      }
      this._deliver(sub, ev);
    };
    es.addEventListener("notice", (m) => {
      try {
        this._notice(sub, JSON.parse(m.data));
      } catch {
        // A notice we cannot read changes nothing.
      }
    });
    // EventSource would reconnect on its own at a fixed interval and give up for good on any
    // non-200 answer; we close it and reconnect from our cursor with backoff instead.
    es.onerror = () => {
      if (sub.es !== es) return;
      this._closeEs(sub);
      this._sseFailed(sub);
    };
  }

  _closeEs(sub) {
    if (!sub.es) return;
    sub.es.onopen = sub.es.onmessage = sub.es.onerror = null;
    sub.es.close();
    sub.es = null;
  }

  async _sseFailed(sub) {
    if (sub.ended) return;
    this._emit("status", { transport: "sse", state: "connecting", stream: sub.stream });
    const probe = await this._probe(sub.stream);
    if (sub.ended) return;
    if (probe.state === "refused") {
      this._fail(sub, probe.error);
      return;
    }
    if (probe.state === "up" && probe.info?.closed && probe.info.head <= sub.cursor) {
      // The server answers 204 to a cursor at a closed stream's head: it is finished.
      this._unsubscribe(sub, "closed");
      return;
    }
    const delayMs = backoffDelay(sub.attempt++, this.backoff);
    this._stats.reconnects++;
    this._emit("status", { transport: "sse", state: "waiting", stream: sub.stream, attempt: sub.attempt, delayMs });
    sub.timer = setTimeout(() => this._openEs(sub), delayMs);
  }
}

/**
 * Appends `w` to a message whose data is `m`, by tailcast's rule (openapi.yaml
 * `NewEvent.append`): two objects merge field by field over `w`'s top-level fields (two
 * strings concatenate, anything else replaces); two strings concatenate; otherwise `w`
 * replaces `m`.
 */
export function mergeAppend(m, w) {
  const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
  if (isObj(m) && isObj(w)) {
    const out = { ...m };
    for (const [k, v] of Object.entries(w)) {
      out[k] = typeof out[k] === "string" && typeof v === "string" ? out[k] + v : v;
    }
    return out;
  }
  if (typeof m === "string" && typeof w === "string") return m + w;
  return w;
}

/**
 * A stream's messages as its events build them, whether they come one by one or compacted:
 * an event with a key and `append` extends that key's message, any other event starts one.
 */
export class Messages {
  constructor() {
    /** @type {{key?: string, type: string, data: any, seq: number}[]} in order of start */
    this.list = [];
    this._open = new Map();
  }

  /** Applies one envelope; returns the message it started or extended. */
  apply(ev) {
    const open = ev.key !== undefined ? this._open.get(ev.key) : undefined;
    if (ev.append && open) {
      open.data = mergeAppend(open.data, ev.data);
      open.seq = ev.seq;
      return open;
    }
    const msg = { key: ev.key, type: ev.type, data: ev.data, seq: ev.seq };
    this.list.push(msg);
    if (ev.key !== undefined) this._open.set(ev.key, msg);
    return msg;
  }
}

function enc(s) {
  return encodeURIComponent(s);
}

function query(params) {
  const parts = [];
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === "") continue;
    parts.push(`${k}=${encodeURIComponent(v)}`);
  }
  return parts.length ? "?" + parts.join("&") : "";
}
