// Types for @tailcast/client/ai-sdk. The AI SDK's types are referred to structurally, so the
// package needs no dependency on `ai`; its objects fit the AI SDK's `ChatTransport` and
// `UIMessageChunk`.

import { TailcastError, BackoffOptions } from "./tailcast.js";

export { TailcastError };

/** The event type that carries one UIMessageChunk as its data. */
export declare const UI_EVENT_TYPE: "ui";

/** A UIMessageChunk of the AI SDK (`{type: "text-delta", id, delta}` and so on). */
export type UIMessageChunkLike = { type: string; [key: string]: unknown };

type Resolvable<T> = T | Promise<T> | (() => T | Promise<T>);

export interface PipeOptions {
  /** The tailcast stream to write the answer into. */
  stream: string;
  /** tailcast's base URL. */
  url: string;
  /** A token with `write` on the stream. */
  token?: Resolvable<string | undefined>;
  /** Event ids are idPrefix + the chunk's index (default "ui-"). */
  idPrefix?: string;
  /** Most chunks per append (default 200). */
  maxBatch?: number;
  /** Close the stream at the end (default true). */
  close?: boolean;
  /** How long transient failures are retried (default 60000 ms). */
  retryForMs?: number;
  backoff?: BackoffOptions;
  fetch?: typeof fetch;
  signal?: AbortSignal;
}

/**
 * Writes a UI message stream into tailcast as `ui` events and closes the stream. If the
 * source fails, appends `{"type":"error","errorText": <message>}`, closes, and rejects with
 * the source's error. Refusals (401, 403, a closed stream) reject with a TailcastError.
 */
export declare function pipeUIMessageStream(
  readable: ReadableStream<UIMessageChunkLike> | AsyncIterable<UIMessageChunkLike>,
  options: PipeOptions,
): Promise<{ chunks: number; lastSeq: number }>;

export interface ReadOptions {
  url: string;
  stream: string;
  token?: Resolvable<string | undefined>;
  fetch?: typeof fetch;
  signal?: AbortSignal;
  backoff?: BackoffOptions;
  /** How long failed reconnects are retried (default 120000 ms). */
  retryForMs?: number;
}

/**
 * Follows a stream's `ui-message-stream` until `[DONE]`, resuming after the last chunk across
 * disconnects and restarts; null when the stream does not exist. Ends with a TailcastError
 * (`unauthorized`, `forbidden`, `cors_refused`, `invalid_chunk`) on a refusal.
 */
export declare function readUIMessageChunks(options: ReadOptions): Promise<ReadableStream<UIMessageChunkLike> | null>;

export interface ActiveStream {
  stream: string;
  token?: string;
}

export interface ChatTransportOptions {
  /** tailcast's base URL, as the browser reaches it. */
  url: string;
  /** The app's route (default "/api/chat"); it answers JSON `{stream, token?}`. */
  api?: string;
  token?: Resolvable<string | undefined>;
  headers?: Resolvable<Record<string, string>>;
  body?: Resolvable<object>;
  credentials?: RequestCredentials;
  /** Which stream holds a chat's latest answer (default: remembered in `storage`). */
  streamFor?: (chatId: string) => ActiveStream | string | null | Promise<ActiveStream | string | null>;
  /** Default: sessionStorage where there is one; null for memory only. */
  storage?: { getItem(key: string): string | null; setItem(key: string, value: string): void } | null;
  fetch?: typeof fetch;
  backoff?: BackoffOptions;
  retryForMs?: number;
}

/** A ChatTransport for the AI SDK's useChat / Chat whose answers are read from tailcast. */
export declare class TailcastChatTransport {
  constructor(options: ChatTransportOptions);
  readonly url: string;
  readonly api: string;
  /** reconnectToStream replays the answer from its start. */
  readonly resumeStreamIsReplay: true;
  sendMessages(options: {
    trigger: "submit-message" | "regenerate-message";
    chatId: string;
    messageId: string | undefined;
    messages: unknown[];
    abortSignal: AbortSignal | undefined;
    headers?: Record<string, string> | Headers;
    body?: object;
    metadata?: unknown;
  }): Promise<ReadableStream<UIMessageChunkLike>>;
  reconnectToStream(options: {
    chatId: string;
    abortSignal?: AbortSignal;
    headers?: Record<string, string> | Headers;
    body?: object;
    metadata?: unknown;
  }): Promise<ReadableStream<UIMessageChunkLike> | null>;
}
