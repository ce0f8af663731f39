// Resumable AI SDK chats on tailcast, tested with the real `ai` package from npm (its
// DefaultChatTransport, readUIMessageStream, AbstractChat, streamText with its own mock model)
// against real tailcast processes. The tailcast client is imported from the tarball that
// `npm pack` makes, installed in a fresh folder, as an app would get it; the example app
// (examples/ai-sdk) runs from that folder too, and one test drives its page in Chromium.

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { readFile } from "node:fs/promises";
import http from "node:http";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { AbstractChat, DefaultChatTransport, readUIMessageStream, simulateReadableStream } from "ai";
import { Server, stopAllServers, freePort, launchBrowser, waitFor, ROOT, artifact } from "./helpers.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkgRoot = path.resolve(here, "..");

/**
 * `npm pack` of clients/js, installed into a fresh folder with the example app's files; the
 * AI SDK and esbuild are linked from this package's dev dependencies (the client has no
 * runtime dependency of its own, so the tarball installs without the registry).
 */
function installPackedPackage() {
  const dir = mkdtempSync(path.join(os.tmpdir(), "tailcast-pack-"));
  const out = execFileSync("npm", ["pack", "--json", "--pack-destination", dir], { cwd: pkgRoot, encoding: "utf8" });
  const tarball = path.join(dir, JSON.parse(out)[0].filename);
  const app = path.join(dir, "app");
  mkdirSync(app);
  writeFileSync(path.join(app, "package.json"), JSON.stringify({ name: "packed-app", private: true, type: "module" }));
  execFileSync("npm", ["install", "--no-audit", "--no-fund", "--offline", tarball], { cwd: app, stdio: "ignore" });
  for (const dep of ["ai", "esbuild"]) symlinkSync(path.join(pkgRoot, "node_modules", dep), path.join(app, "node_modules", dep));
  for (const f of ["server.js", "page.js", "index.html"]) copyFileSync(path.join(ROOT, "examples", "ai-sdk", f), path.join(app, f));
  return { dir, app };
}

let packed;
let client; // @tailcast/client/ai-sdk, from the tarball
let example; // examples/ai-sdk/server.js, run from the packed folder
before(async () => {
  packed = installPackedPackage();
  const installed = readdirSync(path.join(packed.app, "node_modules", "@tailcast", "client")).sort();
  assert.deepEqual(installed, ["README.md", "ai-sdk.d.ts", "ai-sdk.js", "package.json", "tailcast.d.ts", "tailcast.js"]);
  const require = createRequire(path.join(packed.app, "index.js"));
  client = await import(pathToFileURL(require.resolve("@tailcast/client/ai-sdk")));
  const main = await import(pathToFileURL(require.resolve("@tailcast/client")));
  assert.equal(typeof main.TailcastClient, "function");
  example = await import(pathToFileURL(path.join(packed.app, "server.js")));
});
after(async () => {
  await stopAllServers();
  if (packed) rmSync(packed.dir, { recursive: true, force: true });
});

const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()().catch(() => {});
  await stopAllServers();
});

/** UIMessageChunks as streamText writes them, answering with `words`. */
function answerChunks(messageId, words) {
  return [
    { type: "start", messageId },
    { type: "start-step" },
    { type: "text-start", id: "t" },
    ...words.map((delta) => ({ type: "text-delta", id: "t", delta })),
    { type: "text-end", id: "t" },
    { type: "finish-step" },
    { type: "finish", finishReason: "stop" },
  ];
}

/** The final UIMessage the AI SDK builds from a chunk stream, and how many states it went through. */
async function finalMessage(stream) {
  let last;
  let states = 0;
  for await (const m of readUIMessageStream({ stream, terminateOnError: true })) {
    last = m;
    states++;
  }
  return { message: last, states };
}

const endpoint = (server, stream) => `${server.url}/v1/streams/${encodeURIComponent(stream)}/ui-message-stream`;

/** The AI SDK's own transport, pointed at tailcast's endpoint for `stream`. */
function sdkTransport(server, stream) {
  return new DefaultChatTransport({ prepareReconnectToStreamRequest: () => ({ api: endpoint(server, stream) }) });
}

async function listenOn(httpServer) {
  await new Promise((resolve) => httpServer.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => new Promise((resolve) => httpServer.close(resolve)));
  return `http://127.0.0.1:${httpServer.address().port}`;
}

describe("the AI SDK's DefaultChatTransport over tailcast", () => {
  test("reconnectToStream + readUIMessageStream: while chunks are appended, after the close, and 204 for a missing stream", async () => {
    const server = await Server.spawn();
    const words = Array.from({ length: 30 }, (_, i) => `w${i} `);
    const chunks = answerChunks("m1", words);
    const expected = (await finalMessage(simulateReadableStream({ chunks, chunkDelayInMs: null }))).message;
    assert.equal(expected.parts.find((p) => p.type === "text").text, words.join(""));

    // Written slowly by the real helper, through the client's pipe.
    const writing = client.pipeUIMessageStream(simulateReadableStream({ chunks, initialDelayInMs: 0, chunkDelayInMs: 40 }), { stream: "chat:live", url: server.url, maxBatch: 4 });
    await waitFor(async () => (await server.fetch("GET", "/v1/streams/chat:live")).body?.head >= 2, "the first chunks in tailcast");
    const live = await sdkTransport(server, "chat:live").reconnectToStream({ chatId: "live" });
    assert.ok(live, "the stream exists: a chunk stream, not null");
    const seen = [];
    let firstSeenWhileWriting = false;
    let writingDone = false;
    writing.then(() => (writingDone = true));
    let last;
    for await (const m of readUIMessageStream({ stream: live, terminateOnError: true })) {
      if (!seen.length) firstSeenWhileWriting = !writingDone;
      seen.push(m);
      last = m;
    }
    const result = await writing;
    assert.ok(firstSeenWhileWriting, "the reader got the answer while it was still being written");
    assert.ok(seen.length > 5, `followed live through ${seen.length} states`);
    assert.deepEqual(last, expected);
    assert.equal(result.chunks, chunks.length);

    // Every chunk once, as `ui` events with idempotent ids, then the close.
    const events = await server.readAll("chat:live");
    assert.deepEqual(events.filter((e) => e.type === "ui").map((e) => e.data), chunks);
    assert.deepEqual(events.filter((e) => e.type === "ui").map((e) => e.id), chunks.map((_, i) => `ui-${i}`));
    assert.equal(events.at(-1).type, "stream.closed");

    // After the close: the whole answer again, ended by [DONE].
    const replay = await sdkTransport(server, "chat:live").reconnectToStream({ chatId: "live" });
    assert.deepEqual((await finalMessage(replay)).message, expected);
    const raw = await fetch(endpoint(server, "chat:live"));
    assert.equal(raw.headers.get("x-vercel-ai-ui-message-stream"), "v1");
    assert.ok((await raw.text()).endsWith("data: [DONE]\n\n"));

    // A stream that does not exist: 204, which the AI SDK reads as "nothing to resume".
    assert.equal(await sdkTransport(server, "chat:none").reconnectToStream({ chatId: "none" }), null);
  });

  test("a failing source leaves a readable error chunk and a closed stream", async () => {
    const server = await Server.spawn();
    const source = new ReadableStream({
      start(c) {
        c.enqueue({ type: "start", messageId: "m2" });
        c.enqueue({ type: "text-start", id: "t" });
        c.enqueue({ type: "text-delta", id: "t", delta: "half an ans" });
        c.error(new Error("the model went away"));
      },
    });
    await assert.rejects(client.pipeUIMessageStream(source, { stream: "chat:err", url: server.url }), /the model went away/);
    const events = await server.readAll("chat:err");
    assert.deepEqual(events.at(-2).data, { type: "error", errorText: "the model went away" });
    assert.equal(events.at(-1).type, "stream.closed");
    const errors = [];
    const stream = await sdkTransport(server, "chat:err").reconnectToStream({ chatId: "err" });
    for await (const _ of readUIMessageStream({ stream, onError: (e) => errors.push(e.message) }));
    assert.deepEqual(errors, ["the model went away"]);
  });
});

/** AbstractChat (what useChat wraps) with a plain state, as framework bindings give it. */
class TestChat extends AbstractChat {
  constructor(init) {
    const state = {
      status: "ready",
      error: undefined,
      messages: [],
      pushMessage(m) {
        this.messages = [...this.messages, m];
      },
      popMessage() {
        this.messages = this.messages.slice(0, -1);
      },
      replaceMessage(i, m) {
        this.messages = this.messages.map((old, j) => (j === i ? m : old));
      },
      snapshot: (t) => structuredClone(t),
    };
    super({ ...init, state });
    this.testState = state;
  }
}

/** Sends `text` on a fresh chat and returns its messages once the answer is complete. */
async function chatRun(transport, chatId, text, whileStreaming) {
  const chat = new TestChat({ id: chatId, transport, generateId: () => `u-${chatId}` });
  const done = chat.sendMessage({ text });
  if (whileStreaming) await whileStreaming(chat);
  await done;
  assert.equal(chat.testState.status, "ready", `chat ended with ${chat.testState.error}`);
  return chat.testState.messages;
}

describe("TailcastChatTransport", () => {
  test("an answer interrupted by kill -9 and a restart of tailcast ends exactly as an uninterrupted one", async () => {
    const server = await Server.spawn();
    const app = await example.createApp({ tailcastUrl: server.url, delayMs: 25 });
    const appUrl = await listenOn(app);
    const transport = new client.TailcastChatTransport({ url: server.url, api: `${appUrl}/api/chat`, backoff: { initialMs: 50, maxMs: 400 }, storage: null });

    const calm = await chatRun(transport, "calm", "hello");
    const answer = calm.at(-1);
    assert.equal(answer.role, "assistant");
    assert.match(answer.parts.find((p) => p.type === "text").text, /^You said: "hello"\. Every word/);

    const stormy = await chatRun(transport, "stormy", "hello", async (chat) => {
      await waitFor(() => chat.testState.messages.at(-1)?.role === "assistant" && chat.testState.messages.at(-1).parts.some((p) => p.type === "text" && p.text.length > 12), "the answer has begun");
      await server.kill("SIGKILL");
      await server.start();
    });
    const textOf = (m) => m.parts.find((p) => p.type === "text").text;
    const partial = (msgs) => msgs.map((m) => ({ ...m, id: m.role }));
    assert.equal(textOf(stormy.at(-1)), textOf(answer));
    assert.deepEqual(partial(stormy), partial(calm));
    await app.runsDone();

    // Nothing doubled by the producer's retries across the restart.
    const streams = (await server.fetch("GET", "/v1/streams?prefix=chat:stormy:")).body.streams;
    assert.equal(streams.length, 1);
    const events = await server.readAll(streams[0].name);
    const ids = events.filter((e) => e.type === "ui").map((e) => e.id);
    assert.equal(new Set(ids).size, ids.length);
    assert.deepEqual(ids, ids.map((_, i) => `ui-${i}`));
  });

  test("the chat's stop() ends the read at once and leaves the chat ready", async () => {
    const server = await Server.spawn();
    const app = await example.createApp({ tailcastUrl: server.url, delayMs: 50 });
    const appUrl = await listenOn(app);
    const transport = new client.TailcastChatTransport({ url: server.url, api: `${appUrl}/api/chat`, storage: null });
    const chat = new TestChat({ id: "stopped", transport });
    const done = chat.sendMessage({ text: "stop me" });
    await waitFor(() => chat.testState.messages.at(-1)?.role === "assistant", "the answer has begun");
    await chat.stop();
    await done;
    assert.equal(chat.testState.status, "ready");
    const text = chat.testState.messages.at(-1).parts.find((p) => p.type === "text")?.text ?? "";
    await app.runsDone();
    assert.ok(text.length < 'You said: "stop me". Every word'.length + 40, `the read went on after stop(): ${text}`);
  });

  test("reconnectToStream resumes a remembered answer; 401 and 403 end it with a terminal error", async () => {
    const secret = "test-secret-that-is-at-least-32-bytes-long";
    const server = await Server.spawn({ env: { TAILCAST_JWT_SECRET: secret, TAILCAST_ADMIN_TOKEN: "admin-token" } });
    const chunks = answerChunks("m3", ["a ", "b"]);
    await client.pipeUIMessageStream(simulateReadableStream({ chunks, chunkDelayInMs: null }), { stream: "chat:auth", url: server.url, token: "admin-token" });
    const storage = new Map();
    const store = { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, v) };
    const t = (token) => new client.TailcastChatTransport({ url: server.url, token, storage: store });

    assert.equal(await t("admin-token").reconnectToStream({ chatId: "auth" }), null, "nothing remembered for this chat");
    store.setItem("tailcast-chat:auth", JSON.stringify({ stream: "chat:auth" }));
    const resumed = await t("admin-token").reconnectToStream({ chatId: "auth" });
    assert.equal((await finalMessage(resumed)).message.parts.find((p) => p.type === "text").text, "a b");

    await assert.rejects(t(undefined).reconnectToStream({ chatId: "auth" }), (e) => e.name === "TailcastError" && e.code === "unauthorized" && e.status === 401);
    const reader = jwt(secret, { sub: "x", exp: Math.floor(Date.now() / 1000) + 600, read: ["other:*"] });
    await assert.rejects(t(reader).reconnectToStream({ chatId: "auth" }), (e) => e.code === "forbidden" && e.status === 403);
    await assert.rejects(client.pipeUIMessageStream(simulateReadableStream({ chunks, chunkDelayInMs: null }), { stream: "chat:auth2", url: server.url, token: reader }), (e) => e.code === "forbidden");
  });
});

describe("the example app in Chromium", () => {
  test("a page reload mid-answer resumes the answer from tailcast, across origins", async () => {
    const appPort = await freePort();
    const appOrigin = `http://127.0.0.1:${appPort}`;
    const server = await Server.spawn({ env: { TAILCAST_CORS_ORIGINS: appOrigin } });
    const app = await example.createApp({ tailcastUrl: server.url, delayMs: 40 });
    await new Promise((resolve) => app.listen(appPort, "127.0.0.1", resolve));
    cleanups.push(() => new Promise((resolve) => app.close(resolve)));
    const browser = await launchBrowser();
    cleanups.push(() => browser.close());
    const page = await browser.context.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(e.message));

    await page.goto(appOrigin);
    await page.waitForFunction(() => document.querySelector("#status")?.dataset.status === "ready", null, { polling: 50 });
    await page.fill("input", "from the browser");
    await page.click("button");
    const assistant = 'li[data-role="assistant"]';
    await page.waitForFunction((sel) => (document.querySelector(sel)?.textContent ?? "").split(" ").length > 6, assistant, { polling: 20 });
    const before = await page.textContent(assistant);
    await page.reload();
    await page.waitForFunction((sel) => document.querySelector("#status")?.dataset.status === "ready" && /repeats none\.$/.test(document.querySelector(sel)?.textContent ?? ""), assistant, { timeout: 20000, polling: 50 });
    const text = await page.textContent(assistant);
    assert.ok(text.startsWith(before.trim()), `resumed answer ${JSON.stringify(text)} does not continue ${JSON.stringify(before)}`);
    assert.equal(text, 'You said: "from the browser". Every word of this answer is an event in tailcast, so a reload, a dropped connection or a restart of tailcast loses none of them and repeats none.');
    await page.screenshot({ path: artifact("ai-sdk-chat.png") });

    // The same app with a tailcast that does not allow the page's origin: the chat shows a
    // terminal `cors_refused` error instead of reconnecting forever.
    const strict = await Server.spawn({ env: { TAILCAST_CORS_ORIGINS: "http://example.invalid" } });
    const strictApp = await example.createApp({ tailcastUrl: strict.url, delayMs: 5 });
    const strictOrigin = await listenOn(strictApp);
    const consoleErrors = [];
    page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
    await page.goto(strictOrigin);
    await page.waitForFunction(() => document.querySelector("#status")?.dataset.status === "ready", null, { polling: 50 });
    await page.fill("input", "hello");
    await page.click("button");
    await page.waitForFunction(() => document.querySelector("#status")?.dataset.status === "error", null, { timeout: 20000, polling: 50 });
    const status = await page.textContent("#status");
    await app.runsDone();
    await strictApp.runsDone();
    assert.match(status, /refused this page's origin http:\/\/127\.0\.0\.1:\d+ \(start tailcast with --cors-origins/);
    assert.deepEqual(pageErrors, []);
  });
});

describe("refusals in the browser", () => {
  test("TailcastClient ends a subscription with a terminal cors_refused error, over WebSocket and SSE", async () => {
    const strict = await Server.spawn({ env: { TAILCAST_CORS_ORIGINS: "http://example.invalid" } });
    // A page on another origin serving the packed client module.
    const pkgDir = path.join(packed.app, "node_modules", "@tailcast", "client");
    const pageOrigin = await listenOn(
      http.createServer(async (req, res) => {
        if (req.url === "/tailcast.js") res.writeHead(200, { "content-type": "text/javascript" }).end(await readFile(path.join(pkgDir, "tailcast.js")));
        else res.writeHead(200, { "content-type": "text/html" }).end("<!doctype html><title>other origin</title>");
      }),
    );
    const browser = await launchBrowser();
    cleanups.push(() => browser.close());
    const page = await browser.context.newPage();
    await page.goto(pageOrigin);
    for (const transport of ["ws", "sse"]) {
      const outcome = await page.evaluate(
        async ({ url, transport }) => {
          const { TailcastClient } = await import("/tailcast.js");
          const client = new TailcastClient({ url, transport, backoff: { initialMs: 50, maxMs: 200 } });
          const statuses = [];
          client.on("status", (s) => statuses.push(s.state));
          const err = await new Promise((resolve) => {
            client.subscribe("run:1", { onError: resolve }, () => {});
            setTimeout(() => resolve(null), 15000);
          });
          client.close?.();
          return { code: err?.code, name: err?.name, message: err?.message, statuses };
        },
        { url: strict.url, transport },
      );
      assert.equal(outcome.code, "cors_refused", `${transport}: ${JSON.stringify(outcome)}`);
      assert.equal(outcome.name, "TailcastError");
      assert.match(outcome.message, /--cors-origins http:\/\/127\.0\.0\.1:\d+/);
    }
  });
});

/** An HS256 JWT, signed with node:crypto. */
function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  const sig = createHmac("sha256", secret).update(body).digest("base64url");
  return `${body}.${sig}`;
}
