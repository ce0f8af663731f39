// ai-sdk.js: resumable Vercel AI SDK chats on tailcast, without runtime dependencies.
//
// - pipeUIMessageStream(readable, { stream, url, token }) runs in the app's server route: it
//   writes an AI SDK UI message stream (`result.toUIMessageStream()`) into a tailcast stream
//   as events of type `ui`, one UIMessageChunk each, in batches with idempotent ids, and
//   closes the stream at the end.
// - TailcastChatTransport is a `ChatTransport` for `useChat`: `sendMessages` POSTs to the
//   app's route (which starts the run and answers `{stream}`), then reads the answer from
//   tailcast's `GET /v1/streams/{stream}/ui-message-stream`, riding through disconnects and
//   server restarts by resuming after the last chunk it received; `reconnectToStream` (after
//   a page reload) replays the answer from tailcast.

import { TailcastError, backoffDelay, classifyFetchFailure, isTransient } from "./tailcast.js";

export { TailcastError };

/** The event type that carries one UIMessageChunk as its data. */
export const UI_EVENT_TYPE = "ui";

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(resolve, ms);
    signal?.addEventListener?.("abort", () => {
      clearTimeout(t);
      reject(signal.reason);
    }, { once: true });
  });

const resolveValue = async (v) => (typeof v === "function" ? await v() : await v);

function authHeaders(token) {
  return token ? { authorization: `Bearer ${token}` } : {};
}

/** Reads a problem+json answer into a TailcastError. */
async function problem(res, what) {
  let doc = null;
  try {
    doc = await res.json();
  } catch {
    // Not JSON (a proxy's page): reported by status.
  }
  const code = doc?.code ?? `http_${res.status}`;
  return new TailcastError(code, `${what}: ${doc?.detail || doc?.title || `HTTP ${res.status}`}`, res.status, doc ?? undefined);
}

/**
 * @typedef {object} PipeOptions
 * @property {string} stream The tailcast stream to write the answer into.
 * @property {string} url tailcast's base URL (e.g. "http://127.0.0.1:8080").
 * @property {string | (() => string | Promise<string>)} [token] A token with `write` on the stream.
 * @property {string} [idPrefix="ui-"] Event ids are idPrefix + the chunk's index: a retried
 *   batch (after a lost answer or a tailcast restart) is never appended twice.
 * @property {number} [maxBatch=200] Most chunks per append.
 * @property {boolean} [close=true] Close the stream at the end (readers then get [DONE]).
 * @property {number} [retryForMs=60000] How long transient failures (tailcast away, 5xx, 429)
 *   are retried before giving up.
 * @property {import("./tailcast.js").BackoffOptions} [backoff]
 * @property {typeof fetch} [fetch]
 * @property {AbortSignal} [signal]
 */

/**
 * Writes a UI message stream into tailcast. While one append is in flight, the chunks that
 * arrive are queued and go in the next one, so a fast model costs few requests and a slow one
 * adds no delay. Resolves with `{ chunks, lastSeq }` once everything is appended and the
 * stream closed.
 *
 * If `readable` fails, the chunk `{"type":"error","errorText":"<the error's message>"}` is
 * appended (the AI SDK shows it as the chat's error), the stream is closed, and the promise
 * rejects with the original error. A refusal from tailcast (401, 403, a closed stream, a bad
 * event) rejects at once with a TailcastError; transient failures are retried for
 * `retryForMs`.
 *
 * @param {ReadableStream<object> | AsyncIterable<object>} readable UIMessageChunks.
 * @param {PipeOptions} options
 */
export async function pipeUIMessageStream(readable, options) {
  const { stream, url } = options ?? {};
  if (!stream || !url) throw new TypeError("pipeUIMessageStream: stream and url are required");
  const base = url.replace(/\/+$/, "");
  const fetchFn = options.fetch ?? globalThis.fetch.bind(globalThis);
  const idPrefix = options.idPrefix ?? "ui-";
  const maxBatch = options.maxBatch ?? 200;
  const retryForMs = options.retryForMs ?? 60000;
  const path = `/v1/streams/${encodeURIComponent(stream)}`;

  async function call(p, body) {
    const started = Date.now();
    for (let attempt = 0; ; attempt++) {
      const token = await resolveValue(options.token);
      let res;
      let err;
      try {
        res = await fetchFn(base + p, {
          method: "POST",
          headers: { "content-type": "application/json", accept: "application/json", ...authHeaders(token) },
          body: JSON.stringify(body),
          signal: options.signal,
        });
      } catch (e) {
        if (options.signal?.aborted) throw e;
        err = new TailcastError("network", `cannot reach ${base}: ${e.message}`);
      }
      if (res?.ok) return res.json();
      if (res) err = await problem(res, `POST ${p}`);
      if (!isTransient(err) || Date.now() - started > retryForMs) throw err;
      await sleep(backoffDelay(attempt, options.backoff), options.signal);
    }
  }

  let next = 0; // index of the next chunk to append
  let lastSeq = 0;
  const queue = [];
  let ended = false;
  let failure = null;
  let wake = null;
  const notify = () => {
    wake?.();
    wake = null;
  };

  // Reads the source into the queue while the writer below appends what is there.
  let reader = null;
  const reading = (async () => {
    try {
      if (typeof readable?.getReader === "function") {
        reader = readable.getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          queue.push(value);
          notify();
        }
      } else {
        for await (const chunk of readable) {
          queue.push(chunk);
          notify();
        }
      }
    } catch (e) {
      failure = e;
      queue.push({ type: "error", errorText: e?.message ?? String(e) });
    } finally {
      ended = true;
      notify();
    }
  })();

  try {
    for (;;) {
      if (!queue.length) {
        if (ended) break;
        await new Promise((resolve) => (wake = resolve));
        continue;
      }
      const batch = queue.splice(0, maxBatch);
      const events = batch.map((data, i) => ({ type: UI_EVENT_TYPE, data, id: `${idPrefix}${next + i}` }));
      const ack = await call(`${path}/events`, events);
      next += batch.length;
      lastSeq = ack?.last_seq ?? lastSeq;
    }
    if (options.close ?? true) {
      try {
        await call(`${path}/close`, failure ? { reason: "error" } : { reason: "finished" });
      } catch (e) {
        // Closed already: a retried close whose first answer was lost.
        if (e.code !== "stream_closed") throw e;
      }
    }
  } catch (e) {
    // Stop reading a source nobody will write anywhere.
    if (!ended) reader?.cancel(e).catch(() => {});
    throw e;
  }
  await reading;
  if (failure) throw failure;
  return { chunks: next, lastSeq };
}

/**
 * Parses a text/event-stream body, calling `onEvent({id, data})` per event.
 * @param {ReadableStream<Uint8Array>} body
 */
async function readSse(body, onEvent, signal) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let data = [];
  let id = null;
  const abort = () => reader.cancel().catch(() => {});
  signal?.addEventListener?.("abort", abort, { once: true });
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
        if (line === "") {
          if (data.length) onEvent({ id, data: data.join("\n") });
          data = [];
          id = null;
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "data") data.push(value);
        else if (field === "id") id = value;
      }
    }
  } finally {
    signal?.removeEventListener?.("abort", abort);
  }
}

/**
 * Follows `GET /v1/streams/{stream}/ui-message-stream` as a ReadableStream of UIMessageChunks
 * until `data: [DONE]`, reconnecting after the last chunk received (`Last-Event-ID`) whenever
 * the connection breaks or tailcast restarts. 401/403 and a CORS refusal end it with a
 * TailcastError (`unauthorized`, `forbidden`, `cors_refused`); so does `retryForMs` of
 * failed reconnects.
 *
 * @param {{url: string, stream: string, token?: string | (() => string | Promise<string>),
 *   fetch?: typeof fetch, signal?: AbortSignal, backoff?: object, retryForMs?: number}} opts
 * @returns {Promise<ReadableStream<object> | null>} null when the stream does not exist.
 */
export async function readUIMessageChunks(opts) {
  const fetchFn = opts.fetch ?? globalThis.fetch.bind(globalThis);
  const endpoint = `${opts.url.replace(/\/+$/, "")}/v1/streams/${encodeURIComponent(opts.stream)}/ui-message-stream`;
  const retryForMs = opts.retryForMs ?? 120000;
  // Aborted by the caller's signal or by cancelling the returned stream (the chat's stop).
  const abort = new AbortController();
  const signal = abort.signal;
  if (opts.signal?.aborted) abort.abort(opts.signal.reason);
  opts.signal?.addEventListener?.("abort", () => abort.abort(opts.signal.reason), { once: true });
  let cursor = null;
  let attempt = 0;
  let failingSince = null;

  /** One GET: the response, null for 204, or a thrown TailcastError. */
  async function open() {
    const token = await resolveValue(opts.token);
    const headers = { accept: "text/event-stream", ...authHeaders(token) };
    if (cursor !== null) headers["last-event-id"] = String(cursor);
    let res;
    try {
      res = await fetchFn(endpoint, { headers, signal, cache: "no-store" });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw await classifyFetchFailure(fetchFn, endpoint, e);
    }
    if (res.status === 204) return null;
    if (!res.ok) throw await problem(res, `GET ${endpoint}`);
    return res;
  }

  /** `open()` with retries of transient failures. */
  async function openRetrying() {
    for (;;) {
      try {
        const res = await open();
        attempt = 0;
        failingSince = null;
        return res;
      } catch (e) {
        if (signal?.aborted || !isTransient(e)) throw e;
        failingSince ??= Date.now();
        if (Date.now() - failingSince > retryForMs) throw e;
        await sleep(backoffDelay(attempt++, opts.backoff), signal);
      }
    }
  }

  const first = await openRetrying();
  if (!first) return null;
  let res = first;
  return new ReadableStream({
    async pull(controller) {
      // One pull reads the whole answer: chunks are enqueued as they arrive.
      let done = false;
      for (;;) {
        let bad = null;
        try {
          await readSse(res.body, ({ id, data }) => {
            if (done) return;
            if (data === "[DONE]") {
              done = true;
              return;
            }
            let chunk;
            try {
              chunk = JSON.parse(data);
            } catch {
              bad = new TailcastError("invalid_chunk", `${opts.stream}: event ${id} is not a JSON UIMessageChunk`);
              throw bad;
            }
            controller.enqueue(chunk);
            if (id !== null && id !== "") cursor = Number(id);
          }, signal);
        } catch (e) {
          if (signal.aborted || e === bad) {
            // After a cancel this is a no-op; after the caller's abort the reader sees why.
            controller.error(signal.aborted ? signal.reason : e);
            return;
          }
          // The connection broke mid-answer: resume below.
        }
        if (done) {
          controller.close();
          return;
        }
        // Ended without [DONE] (a restart, a shutdown, a broken connection): resume after the
        // last chunk. A stream that is gone now answers 204: nothing more will come.
        try {
          res = await openRetrying();
        } catch (e) {
          controller.error(signal.aborted ? signal.reason : e);
          return;
        }
        if (!res) {
          controller.close();
          return;
        }
      }
    },
    cancel(reason) {
      abort.abort(reason);
    },
  });
}

const STORAGE_PREFIX = "tailcast-chat:";

/**
 * @typedef {object} ChatTransportOptions
 * @property {string} url tailcast's base URL, as the browser reaches it.
 * @property {string} [api="/api/chat"] The app's route that starts a run: it receives the AI
 *   SDK's usual body (`{id, messages, trigger, messageId, ...body}`), starts writing the answer
 *   into tailcast (pipeUIMessageStream) and answers JSON `{"stream": "...", "token"?: "..."}`
 *   (a token that may read that stream, when tailcast requires one).
 * @property {string | (() => string | Promise<string>)} [token] Token for reading tailcast
 *   when the route gives none.
 * @property {Record<string,string> | (() => Record<string,string> | Promise<Record<string,string>>)} [headers]
 *   Extra headers for the app's route.
 * @property {object | (() => object | Promise<object>)} [body] Extra body fields for the route.
 * @property {RequestCredentials} [credentials] For the app's route.
 * @property {(chatId: string) => ({stream: string, token?: string} | string | null | Promise<{stream: string, token?: string} | string | null>)} [streamFor]
 *   Which tailcast stream holds a chat's latest answer, for `reconnectToStream`. Default: the
 *   one this transport last started for the chat, remembered in `storage` (so a reload of
 *   the page finds it).
 * @property {{getItem(k: string): string|null, setItem(k: string, v: string): void} | null} [storage]
 *   Default: `sessionStorage` where there is one.
 * @property {typeof fetch} [fetch]
 * @property {object} [backoff] Reconnect delays (see BackoffOptions).
 * @property {number} [retryForMs=120000] How long reconnects are retried before the chat errors.
 */

/** A `ChatTransport` for the AI SDK's `useChat` / `Chat` that reads answers from tailcast. */
export class TailcastChatTransport {
  /** @param {ChatTransportOptions} options */
  constructor(options) {
    if (!options?.url) throw new TypeError("TailcastChatTransport: url (tailcast's base URL) is required");
    this.url = options.url;
    this.api = options.api ?? "/api/chat";
    this.options = options;
    /** `reconnectToStream` replays the whole answer (the AI SDK resets its message first). */
    this.resumeStreamIsReplay = true;
    this._fetch = options.fetch ?? ((...a) => globalThis.fetch(...a));
    this._storage = options.storage !== undefined ? options.storage : globalThis.sessionStorage ?? null;
    this._memory = new Map();
  }

  async sendMessages({ chatId, messages, trigger, messageId, abortSignal, headers, body }) {
    const extraHeaders = { ...(await resolveValue(this.options.headers)), ...normalize(headers) };
    const payload = { ...(await resolveValue(this.options.body)), ...body, id: chatId, messages, trigger, messageId };
    let res;
    try {
      res = await this._fetch(this.api, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json", ...extraHeaders },
        body: JSON.stringify(payload),
        credentials: this.options.credentials,
        signal: abortSignal,
      });
    } catch (e) {
      if (abortSignal?.aborted) throw e;
      throw new TailcastError("network", `cannot reach ${this.api}: ${e.message}`);
    }
    if (!res.ok) throw await problem(res, `POST ${this.api}`);
    const started = await res.json().catch(() => null);
    if (!started?.stream) {
      throw new TailcastError("invalid_route_answer", `${this.api} must answer JSON {"stream": "<tailcast stream>"}`, res.status);
    }
    const active = { stream: started.stream, token: started.token };
    this._remember(chatId, active);
    const chunks = await this._read(active, abortSignal);
    // The route answered with a stream that does not exist yet: it had not appended when we
    // looked; the answer is still coming, so follow it.
    return chunks ?? this._readWhenCreated(active, abortSignal);
  }

  async reconnectToStream({ chatId, abortSignal }) {
    const found = this.options.streamFor ? await this.options.streamFor(chatId) : this._recall(chatId);
    if (!found) return null;
    const active = typeof found === "string" ? { stream: found } : found;
    return this._read(active, abortSignal);
  }

  _read(active, signal) {
    return readUIMessageChunks({
      url: this.url,
      stream: active.stream,
      token: active.token ?? this.options.token,
      fetch: this._fetch,
      signal,
      backoff: this.options.backoff,
      retryForMs: this.options.retryForMs,
    });
  }

  async _readWhenCreated(active, signal) {
    for (let attempt = 0; ; attempt++) {
      await sleep(backoffDelay(attempt, { initialMs: 50, maxMs: 1000 }), signal);
      const chunks = await this._read(active, signal);
      if (chunks) return chunks;
      if (attempt > 60) throw new TailcastError("stream_not_found", `the route's stream ${active.stream} was never written`);
    }
  }

  _remember(chatId, active) {
    this._memory.set(chatId, active);
    try {
      this._storage?.setItem(STORAGE_PREFIX + chatId, JSON.stringify(active));
    } catch {
      // Storage full or denied: the in-memory copy still serves this page.
    }
  }

  _recall(chatId) {
    if (this._memory.has(chatId)) return this._memory.get(chatId);
    try {
      const raw = this._storage?.getItem(STORAGE_PREFIX + chatId);
      return raw ? JSON.parse(raw) : null;
    } catch {
      return null;
    }
  }
}

function normalize(headers) {
  if (!headers) return {};
  if (typeof Headers !== "undefined" && headers instanceof Headers) return Object.fromEntries(headers.entries());
  if (Array.isArray(headers)) return Object.fromEntries(headers);
  return headers;
}
