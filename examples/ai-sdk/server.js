// A chat app whose answers live in tailcast: one Node server (no framework) with the route
// that starts a run, the page, and a fake model (the AI SDK's own MockLanguageModelV4 and
// simulateReadableStream: no API key). A reload mid-answer resumes it from tailcast.
//
//   tailcast                                  # in another terminal (or any URL below)
//   TAILCAST_URL=http://127.0.0.1:8080 node server.js
//
// The page is served by this server (same origin as the route); tailcast is another origin,
// so start it with `--cors-origins http://127.0.0.1:3000` (the address this prints).

import http from "node:http";
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { convertToModelMessages, simulateReadableStream, streamText } from "ai";
import { MockLanguageModelV4 } from "ai/test";
import { pipeUIMessageStream } from "@tailcast/client/ai-sdk";

const here = path.dirname(fileURLToPath(import.meta.url));

/** The fake model: says back what it was told, then a fixed text, one word per `delayMs`. */
export function fakeModel({ delayMs = 30 } = {}) {
  return new MockLanguageModelV4({
    doStream: async ({ prompt }) => {
      const last = prompt.filter((m) => m.role === "user").at(-1);
      const said = last?.content.map((p) => (p.type === "text" ? p.text : "")).join("") ?? "";
      const text = `You said: "${said}". Every word of this answer is an event in tailcast, so a reload, a dropped connection or a restart of tailcast loses none of them and repeats none.`;
      const words = text.split(/(?<= )/);
      return {
        stream: simulateReadableStream({
          initialDelayInMs: 0,
          chunkDelayInMs: delayMs,
          chunks: [
            { type: "stream-start", warnings: [] },
            { type: "text-start", id: "t0" },
            ...words.map((delta) => ({ type: "text-delta", id: "t0", delta })),
            { type: "text-end", id: "t0" },
            {
              type: "finish",
              finishReason: { unified: "stop", raw: "stop" },
              usage: {
                inputTokens: { total: said.length, noCache: said.length, cacheRead: 0, cacheWrite: 0 },
                outputTokens: { total: words.length, text: words.length, reasoning: 0 },
              },
            },
          ],
        }),
      };
    },
  });
}

/** The page's script and its imports (the AI SDK, the tailcast client) as one ES module. */
async function bundle() {
  const esbuild = await import("esbuild");
  const out = await esbuild.build({
    entryPoints: [path.join(here, "page.js")],
    bundle: true,
    format: "esm",
    platform: "browser",
    write: false,
    logLevel: "silent",
  });
  return out.outputFiles[0].text;
}

/**
 * The app: `POST /api/chat` starts a run writing into tailcast and answers `{stream}` at once;
 * `GET /` is the page; `GET /config.json` tells it where tailcast is.
 * @param {{tailcastUrl: string, browserTailcastUrl?: string, token?: string, delayMs?: number}} opts
 */
export async function createApp(opts) {
  const page = await readFile(path.join(here, "index.html"), "utf8");
  const script = await bundle();
  const runs = new Set();
  const server = http.createServer(async (req, res) => {
    try {
      if (req.method === "GET" && (req.url === "/" || req.url.startsWith("/?"))) {
        res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end(page);
      } else if (req.method === "GET" && req.url === "/app.js") {
        res.writeHead(200, { "content-type": "text/javascript" }).end(script);
      } else if (req.method === "GET" && req.url === "/config.json") {
        res.writeHead(200, { "content-type": "application/json" }).end(JSON.stringify({ tailcast: opts.browserTailcastUrl ?? opts.tailcastUrl }));
      } else if (req.method === "POST" && req.url === "/api/chat") {
        let body = "";
        for await (const c of req) body += c;
        const { id, messages } = JSON.parse(body);
        // One tailcast stream per answer; the page reads it from tailcast, not from here.
        const stream = `chat:${id}:${randomUUID().slice(0, 8)}`;
        const result = streamText({ model: fakeModel(opts), messages: await convertToModelMessages(messages) });
        const run = pipeUIMessageStream(result.toUIMessageStream({ originalMessages: messages, generateMessageId: () => `answer-${stream}` }), {
          stream,
          url: opts.tailcastUrl,
          token: opts.token,
        })
          .catch((e) => console.error(`run ${stream} failed:`, e))
          .finally(() => runs.delete(run));
        runs.add(run);
        res.writeHead(202, { "content-type": "application/json" }).end(JSON.stringify({ stream }));
      } else {
        res.writeHead(404).end();
      }
    } catch (e) {
      res.writeHead(500, { "content-type": "text/plain" }).end(String(e?.message ?? e));
    }
  });
  /** Resolves when every run started so far has finished writing. */
  server.runsDone = () => Promise.all([...runs]);
  return server;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const tailcastUrl = process.env.TAILCAST_URL ?? "http://127.0.0.1:8080";
  const app = await createApp({ tailcastUrl, token: process.env.TAILCAST_TOKEN });
  const port = Number(process.env.PORT ?? 3000);
  app.listen(port, "127.0.0.1", () => {
    const origin = `http://127.0.0.1:${app.address().port}`;
    console.log(`chat app listening on ${origin} (tailcast at ${tailcastUrl}; start it with --cors-origins ${origin})`);
  });
}
