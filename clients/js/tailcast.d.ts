// Types for tailcast.js (the implementation carries the same JSDoc).

export interface Envelope {
  stream: string;
  seq: number;
  type: string;
  data: unknown;
  id?: string;
  key?: string;
  /** Who appended it: the `sub` of their token (`admin` for the admin token); absent when anonymous. */
  by?: string;
  /** The event extends the message its key names. */
  append?: true;
  /** Compacted reads: this event stands for that many events of one message's run. */
  folded?: number;
  time: string;
}

/** One follower of a stream (see `presence`). */
export interface Member {
  connection_id: string;
  transport: "sse" | "ws" | "ui" | "durable";
  node: string;
  sub?: string;
  label?: string;
  since: string;
}

export interface Notice {
  notice: "gap" | "reset" | "deleted";
  stream: string;
  detail?: string;
  oldest?: number;
  head?: number;
}

export interface SubscribeOptions {
  /** Deliver events with seq > after (default 0: everything). */
  after?: number;
  /** Start at the head, or with the latest event per key then what follows. */
  from?: "now" | "snapshot";
  /** Only these event types. */
  types?: string[];
  /** Compacted follow: the catch-up with each run of appends folded, then the live tail. */
  compact?: boolean;
  onNotice?: (notice: Notice) => void;
  /** The subscription was refused (unauthorized, forbidden, …); it has ended. */
  onError?: (err: TailcastError) => void;
  /** No more events will come. */
  onEnd?: (reason: "closed" | "deleted" | "unsubscribed") => void;
}

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
}

export interface ClientOptions {
  url?: string;
  wsUrl?: string;
  token?: string;
  transport?: "auto" | "ws" | "sse";
  backoff?: BackoffOptions;
  wsOpenTimeoutMs?: number;
  wsFailuresBeforeFallback?: number;
  fetch?: typeof fetch;
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
}

export interface StreamInfo {
  name: string;
  head: number;
  oldest_seq: number;
  created_at: string;
  updated_at: string;
  closed: boolean;
  /** The producer's lease in seconds, null for none. */
  lease_s: number | null;
  /** The last append or heartbeat. */
  last_activity_at: string;
  /** When the stream is closed as abandoned unless renewed; null without a lease or once closed. */
  lease_expires_at: string | null;
}

export interface SubscriptionHandle {
  readonly stream: string;
  /** seq of the last event delivered (null until a `from` start is resolved). */
  readonly cursor: number | null;
  readonly ended: boolean;
  unsubscribe(): void;
}

export interface AppendResult {
  stream: string;
  first_seq: number;
  last_seq: number;
  events: { seq: number; id?: string; duplicate?: boolean }[];
}

export interface ClientStats {
  transport: "ws" | "sse";
  state: string;
  subscriptions: number;
  connectionId: string | null;
  connects: number;
  reconnects: number;
  fallbacks: number;
  eventsReceived: number;
  duplicatesDropped: number;
  lastError: string | null;
  lastEventAt: number | null;
}

export interface StatusChange {
  transport: "ws" | "sse";
  state: string;
  attempt?: number;
  delayMs?: number;
  stream?: string;
  reason?: string;
}

export class TailcastError extends Error {
  constructor(code: string, message: string, status?: number, problem?: object);
  code: string;
  status?: number;
  problem?: object;
}

/**
 * Turns a fetch that failed without an answer into a TailcastError: `cors_refused` (terminal)
 * when a browser page's cross-origin request was refused by CORS while the server is up,
 * else `network` (transient).
 */
export function classifyFetchFailure(fetchFn: typeof fetch, url: string, err: unknown): Promise<TailcastError>;
export function backoffDelay(attempt: number, opts?: BackoffOptions, random?: () => number): number;

export class TailcastClient {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly wsUrl: string;
  token: string | null;
  transport: "ws" | "sse";

  subscribe(stream: string, opts: SubscribeOptions, onEvent: (event: Envelope) => void): SubscriptionHandle;
  subscribe(stream: string, onEvent: (event: Envelope) => void): SubscriptionHandle;
  cursors(): Record<string, number | null>;
  stats(): ClientStats;
  on(name: "status", fn: (s: StatusChange) => void): () => void;
  on(name: "fallback", fn: (f: { reason: string }) => void): () => void;
  on(name: "error", fn: (err: TailcastError) => void): () => void;
  setToken(token: string | null): void;
  close(): void;

  publish(
    stream: string,
    events: { type?: string; data?: unknown; id?: string; key?: string } | { type?: string; data?: unknown; id?: string; key?: string }[],
    opts?: { expectedSeq?: number },
  ): Promise<AppendResult>;
  answer(stream: string, requestId: string, data: unknown): Promise<object>;
  stop(stream: string, reason?: unknown): Promise<AppendResult>;
  /** The agent has stopped: appends `control.stopped` `{stop_seq}` answering the stop at `stopSeq`. */
  stopped(stream: string, stopSeq: number, data?: Record<string, unknown>): Promise<AppendResult>;
  /** The agent will not stop: appends `control.stop_refused` `{stop_seq, reason}`. */
  refuseStop(stream: string, stopSeq: number, reason?: unknown): Promise<AppendResult>;
  /** Whether the stop at `stopSeq` took effect (the agent's answer, or the stream's close). */
  waitForStopOutcome(
    stream: string,
    stopSeq: number,
    opts?: { timeoutMs?: number; pollMs?: number },
  ): Promise<{ outcome: "stopped" | "refused" | "closed" | "timeout"; event: Envelope | null }>;
  /** Sets the stream's lease in seconds (null or 0 removes it). */
  setLease(stream: string, leaseS: number | null): Promise<StreamInfo>;
  /** Renews the stream's lease without appending. */
  heartbeat(stream: string): Promise<StreamInfo>;

  listStreams(opts?: { prefix?: string; limit?: number; afterName?: string }): Promise<{
    streams: { name: string; head: number; created_at: string; updated_at: string; closed: boolean; subscribers: number }[];
    next_after_name?: string | null;
  }>;
  getStream(stream: string): Promise<StreamInfo>;
  readEvents(stream: string, opts?: { after?: number; limit?: number; since?: string; compact?: boolean }): Promise<{
    stream: string;
    events: Envelope[];
    next_after: number;
    head: number;
    closed: boolean;
  }>;
  snapshot(stream: string): Promise<{ stream: string; at: number; events: Envelope[] }>;
  /** Who follows the stream now, on every node. */
  presence(stream: string, opts?: { limit?: number }): Promise<{ stream: string; count: number; members: Member[] }>;
  closeStream(stream: string, reason?: unknown): Promise<object>;
  openInputs(stream: string): Promise<{ inputs: object[] }>;
  requestInput(stream: string, request: object): Promise<{ request_id: string; seq: number; expires_at: string }>;
  serverStats(): Promise<object>;
  request(method: string, path: string, body?: unknown): Promise<any>;
}
export function isTransient(err: unknown): boolean;

/** Appends `w` to a message whose data is `m` (tailcast's append rule). */
export function mergeAppend(m: unknown, w: unknown): unknown;

/** A stream's messages as its events (one by one or compacted) build them. */
export class Messages {
  list: { key?: string; type: string; data: unknown; seq: number }[];
  apply(event: Envelope): { key?: string; type: string; data: unknown; seq: number };
}
