// The JavaScript client, run where it is meant to run: inside Chromium, against real tailcast
// processes that the tests kill and restart.

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";
import { Server, stopAllServers, freePort, launchBrowser, waitFor } from "./helpers.js";

let browser;
before(async () => {
  browser = await launchBrowser();
});
after(async () => {
  await stopAllServers();
  await browser?.close();
});

/** What a test opened besides servers, closed after it whether it passed or not. */
const cleanups = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()().catch(() => {});
  await stopAllServers();
});

/** A page on the server's origin with the client module loaded as `window.tc`. */
async function clientPage(origin) {
  const page = await browser.context.newPage();
  cleanups.push(() => page.close());
  page.on("pageerror", (e) => console.error("page error:", e));
  await page.goto(`${origin}/healthz`);
  await page.evaluate(async () => {
    window.tc = await import("/console/tailcast.js");
  });
  return page;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

/** Appends events n = from..to one request at a time (each with id e<n>); returns the last acknowledged n. */
async function produce(server, stream, from, to, progress) {
  for (let n = from; n <= to; n++) {
    await server.append(stream, { type: "token", data: { n }, id: `e${n}` });
    progress.acked = n;
  }
}

/** Checks every reconnect delay against the backoff rule: within [cap/2, cap] of its attempt. */
function assertBackoff(statuses, { initialMs, maxMs }) {
  const waits = statuses.filter((s) => s.state === "waiting" && typeof s.delayMs === "number");
  assert.ok(waits.length >= 3, `expected at least 3 reconnect delays, got ${JSON.stringify(waits)}`);
  for (const w of waits) {
    const cap = Math.min(maxMs, initialMs * 2 ** (w.attempt - 1));
    assert.ok(w.delayMs >= cap / 2 - 1 && w.delayMs <= cap + 1, `delay ${w.delayMs} for attempt ${w.attempt} outside [${cap / 2}, ${cap}]`);
  }
  assert.ok(waits.some((w) => w.attempt >= 3), "the delays never grew past the second attempt");
}

describe("reconnect across a server restart", () => {
  for (const [transport, signal] of [
    ["ws", "SIGKILL"],
    ["sse", "SIGTERM"],
  ]) {
    test(`${transport}: every event exactly once, in order, after ${signal}`, async () => {
      const server = await Server.spawn();
      const page = await clientPage(server.url);
      const stream = `restart:${transport}`;
      const backoff = { initialMs: 100, maxMs: 1600 };
      await page.evaluate(
        ({ stream, transport, backoff }) => {
          window.seen = [];
          window.statuses = [];
          const c = new window.tc.TailcastClient({ transport: transport === "ws" ? "auto" : "sse", backoff });
          c.on("status", (s) => window.statuses.push(s));
          c.subscribe(stream, { after: 0 }, (ev) => window.seen.push(ev.seq));
          window.client = c;
        },
        { stream, transport, backoff },
      );
      const progress = { acked: 0 };
      const N1 = 400;
      const N = 700;
      // Its failure at the kill is expected; the handler is attached now so it is never unhandled.
      const producer = produce(server, stream, 1, N1, progress).catch((e) => e);
      await waitFor(() => page.evaluate(() => window.seen.length >= 30), "the first 30 events");
      assert.equal(await page.evaluate(() => window.client.stats().transport), transport);

      await server.kill(signal);
      // The append in flight at the kill has an unknown outcome; it is retried below by id.
      await producer;
      assert.ok(progress.acked < N1, "the server was killed mid-stream");
      await waitFor(
        () => page.evaluate(() => window.statuses.filter((s) => s.state === "waiting" && s.delayMs && s.attempt >= 3).length),
        "three failed reconnect attempts while the server is down",
      );
      await server.start();
      await produce(server, stream, progress.acked + 1, N, progress);

      const stored = await server.readAll(stream);
      assert.deepEqual(stored.map((e) => e.data.n), range(1, N), "the log holds each n once, at seq n");
      await waitFor(() => page.evaluate((N) => window.seen.length >= N, N), `all ${N} events`);
      const seen = await page.evaluate(() => window.seen);
      assert.deepEqual(seen, range(1, N));
      const stats = await page.evaluate(() => window.client.stats());
      assert.equal(stats.transport, transport, "no fallback: HTTP was down too, the WebSocket was not blocked");
      assert.ok(stats.reconnects >= 1, `reconnects: ${stats.reconnects}`);
      assertBackoff(await page.evaluate(() => window.statuses), backoff);
      await page.evaluate(() => window.client.close());
      await page.close();
      await server.stop();
    });
  }
});

describe("WebSocket blocked: fallback to SSE", () => {
  test("a proxy that refuses the upgrade", async () => {
    const server = await Server.spawn();
    let refused = 0;
    // Forwards plain HTTP (SSE included, chunk by chunk) and refuses every WebSocket upgrade,
    // like a corporate proxy that does not know WebSockets.
    const proxy = http.createServer((req, res) => {
      const up = http.request(
        { host: "127.0.0.1", port: server.port, path: req.url, method: req.method, headers: req.headers },
        (r) => {
          res.writeHead(r.statusCode, r.headers);
          r.pipe(res);
        },
      );
      up.on("error", () => res.destroy());
      res.on("close", () => up.destroy());
      req.pipe(up);
    });
    proxy.on("upgrade", (_req, socket) => {
      refused++;
      socket.end("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    });
    const port = await freePort();
    await new Promise((r) => proxy.listen(port, "127.0.0.1", r));
    cleanups.push(async () => {
      proxy.close();
      proxy.closeAllConnections();
    });
    const page = await clientPage(`http://127.0.0.1:${port}`);
    await page.evaluate(() => {
      window.seen = { a: [], b: [] };
      window.fallbacks = [];
      const c = new window.tc.TailcastClient({ backoff: { initialMs: 50, maxMs: 400 } });
      c.on("fallback", (f) => window.fallbacks.push(f));
      c.subscribe("blocked:a", { after: 0 }, (ev) => window.seen.a.push(ev.seq));
      c.subscribe("blocked:b", { after: 0 }, (ev) => window.seen.b.push(ev.data));
      window.client = c;
    });
    await server.append("blocked:a", range(1, 20).map((n) => ({ type: "t", data: n })));
    await waitFor(() => page.evaluate(() => window.seen.a.length === 20), "20 events over SSE");
    const stats = await page.evaluate(() => window.client.stats());
    assert.equal(stats.transport, "sse");
    assert.equal(stats.fallbacks, 1);
    assert.ok(refused >= 2, `the client tried the WebSocket (${refused} upgrades refused) before falling back`);
    assert.match((await page.evaluate(() => window.fallbacks))[0].reason, /WebSocket/);

    // Publishing works without the WebSocket (REST), and arrives on the SSE subscription.
    const ack = await page.evaluate(() => window.client.publish("blocked:b", [{ type: "t", data: "x" }, { type: "t", data: "y" }]));
    assert.equal(ack.first_seq, 1);
    assert.equal(ack.last_seq, 2);
    await waitFor(() => page.evaluate(() => window.seen.b.length === 2), "published events back over SSE");
    assert.deepEqual(await page.evaluate(() => window.seen.b), ["x", "y"]);
    // So does stop.
    await page.evaluate(() => window.client.stop("blocked:b", "no sockets here"));
    await waitFor(() => page.evaluate(() => window.seen.b.length === 3), "control.stop over SSE");
    assert.deepEqual((await page.evaluate(() => window.seen.b))[2], { reason: "no sockets here" });
    await server.append("blocked:a", range(21, 30).map((n) => ({ type: "t", data: n })));
    await waitFor(() => page.evaluate(() => window.seen.a.length === 30), "later events");
    assert.deepEqual(await page.evaluate(() => window.seen.a), range(1, 30));
    await page.evaluate(() => window.client.close());
    await page.close();
    await server.stop();
  });

  test("a WebSocket URL nobody answers", async () => {
    const server = await Server.spawn();
    const closed = await freePort();
    const page = await clientPage(server.url);
    await page.evaluate((closed) => {
      window.seen = [];
      const c = new window.tc.TailcastClient({
        wsUrl: `ws://127.0.0.1:${closed}/v1/ws`,
        backoff: { initialMs: 50, maxMs: 400 },
      });
      c.subscribe("closedport", { after: 0 }, (ev) => window.seen.push(ev.seq));
      window.client = c;
    }, closed);
    await server.append("closedport", range(1, 10).map((n) => ({ type: "t", data: n })));
    await waitFor(() => page.evaluate(() => window.seen.length === 10), "10 events over SSE");
    assert.deepEqual(await page.evaluate(() => window.seen), range(1, 10));
    assert.equal(await page.evaluate(() => window.client.stats().transport), "sse");
    await page.evaluate(() => window.client.close());
    await page.close();
    await server.stop();
  });
});

describe("cursor tracking", () => {
  test("40 streams on one client, through a restart, each from its own start", async () => {
    // The server's default pool (16 connections) is fewer than the subscriptions: 40 of them
    // re-made at once after a restart must not starve it (see the Rust test
    // ws::many_catching_up_subscriptions_do_not_starve_the_pool).
    const server = await Server.spawn();
    const page = await clientPage(server.url);
    const streams = range(0, 39).map((i) => `many:${i}`);
    // Streams i%4: 0 from the beginning; 1 after 3 of 5 existing; 2 from now (2 existing);
    // 3 only type "a".
    for (const [i, s] of streams.entries()) {
      if (i % 4 === 1) await server.append(s, range(1, 5).map((n) => ({ type: "a", data: n })));
      if (i % 4 === 2) await server.append(s, range(1, 2).map((n) => ({ type: "a", data: n })));
    }
    await page.evaluate((streams) => {
      window.got = {};
      const c = new window.tc.TailcastClient({ backoff: { initialMs: 50, maxMs: 800 } });
      streams.forEach((s, i) => {
        window.got[s] = [];
        const opts = [{ after: 0 }, { after: 3 }, { from: "now" }, { after: 0, types: ["a"] }][i % 4];
        c.subscribe(s, opts, (ev) => window.got[s].push(ev.seq));
      });
      window.client = c;
    }, streams);
    // from=now is resolved to the head before subscribing: wait until it is, or the first
    // appends below could land before the start.
    await waitFor(
      () => page.evaluate(() => Object.values(window.client.cursors()).every((c) => c !== null)),
      "every cursor resolved",
    );
    let rnd = 7;
    const next = () => (rnd = (rnd * 1103515245 + 12345) % 2 ** 31);
    const round = async (phase) => {
      for (let k = 0; k < 120; k++) {
        const s = streams[next() % streams.length];
        const n = 1 + (next() % 4);
        await server.append(s, range(1, n).map((j) => ({ type: next() % 2 ? "a" : "b", data: k, id: `${phase}-${k}-${j}` })));
      }
    };
    await round(1);
    await server.kill("SIGTERM");
    await server.start();
    await round(2);

    const expected = {};
    for (const [i, s] of streams.entries()) {
      const all = await server.readAll(s);
      let want = all.map((e) => e.seq);
      if (i % 4 === 1) want = want.filter((q) => q > 3);
      if (i % 4 === 2) want = want.filter((q) => q > 2);
      if (i % 4 === 3) want = all.filter((e) => e.type === "a").map((e) => e.seq);
      expected[s] = want;
    }
    await waitFor(
      () => page.evaluate((expected) => Object.entries(expected).every(([s, w]) => window.got[s].length >= w.length), expected),
      "every stream caught up",
    );
    const got = await page.evaluate(() => window.got);
    const cursors = await page.evaluate(() => window.client.cursors());
    for (const [i, s] of streams.entries()) {
      assert.deepEqual(got[s], expected[s], `events of ${s}`);
      const fallbackCursor = i % 4 === 1 ? 3 : i % 4 === 2 ? 2 : 0;
      assert.equal(cursors[s], expected[s].at(-1) ?? fallbackCursor, `cursor of ${s}`);
    }
    const stats = await page.evaluate(() => window.client.stats());
    assert.equal(stats.transport, "ws");
    assert.ok(stats.reconnects >= 1);
    await page.evaluate(() => window.client.close());
    await page.close();
    await server.stop();
  });
});

describe("leases and stop acknowledgement", () => {
  test("the agent answers a stop; the sender sees whether it took effect; a lease lapses to abandoned", async () => {
    const server = await Server.spawn({ env: { TAILCAST_LEASE_SWEEP_MS: "50" } });
    const page = await clientPage(server.url);
    await server.append("agent:1", { type: "token", data: { text: "working" } });
    const result = await page.evaluate(async () => {
      const sender = new window.tc.TailcastClient();
      const agent = new window.tc.TailcastClient();
      const out = {};
      // Stopped: the agent answers with control.stopped naming the stop's seq.
      const stop = await sender.stop("agent:1", "enough");
      const waiting = sender.waitForStopOutcome("agent:1", stop.first_seq, { timeoutMs: 10000 });
      await agent.stopped("agent:1", stop.first_seq);
      out.stopped = await waiting;
      // Refused, with a reason.
      const stop2 = await sender.stop("agent:1");
      await agent.refuseStop("agent:1", stop2.first_seq, "deploy half done");
      out.refused = await sender.waitForStopOutcome("agent:1", stop2.first_seq, { timeoutMs: 10000 });
      // Unanswered: a timeout, not a hang.
      const stop3 = await sender.stop("agent:1");
      out.unanswered = await sender.waitForStopOutcome("agent:1", stop3.first_seq, { timeoutMs: 300 });
      // A lease, renewed by heartbeats, then left to lapse: the stream closes as abandoned and
      // the pending stop's outcome is that close.
      out.leased = await agent.setLease("agent:1", 2);
      for (let i = 0; i < 10; i++) {
        await new Promise((r) => setTimeout(r, 250));
        out.beat = await agent.heartbeat("agent:1");
      }
      out.abandoned = await sender.waitForStopOutcome("agent:1", stop3.first_seq, { timeoutMs: 10000 });
      try {
        await agent.heartbeat("agent:1");
      } catch (err) {
        out.lateBeat = err.code;
      }
      sender.close();
      agent.close();
      return out;
    });
    assert.equal(result.stopped.outcome, "stopped");
    assert.equal(result.stopped.event.type, "control.stopped");
    assert.equal(result.refused.outcome, "refused");
    assert.equal(result.refused.event.data.reason, "deploy half done");
    assert.deepEqual(result.unanswered, { outcome: "timeout", event: null });
    assert.equal(result.leased.lease_s, 2);
    assert.equal(result.beat.closed, false);
    assert.ok(result.beat.lease_expires_at > result.beat.last_activity_at);
    assert.equal(result.abandoned.outcome, "closed");
    assert.equal(result.abandoned.event.data.reason, "abandoned");
    assert.equal(result.lateBeat, "stream_closed");
    const types = (await server.readAll("agent:1")).map((e) => e.type);
    assert.deepEqual(types, ["token", "control.stop", "control.stopped", "control.stop", "control.stop_refused", "control.stop", "stream.closed"]);
  });
});

describe("compacted follow", () => {
  for (const transport of ["ws", "sse"]) {
    test(`${transport}: a late joiner gets the answer folded, then the live tail, and the same messages`, async () => {
      const server = await Server.spawn();
      const page = await clientPage(server.url);
      const stream = `compact:${transport}`;
      const word = (i) => ` w${i}`;
      await server.append(stream, { type: "msg", key: "answer", data: { role: "assistant", text: "" } });
      for (let b = 0; b < 4; b++) {
        await server.append(
          stream,
          range(b * 100, b * 100 + 99).map((i) => ({ type: "msg", key: "answer", append: true, data: { text: word(i) } })),
        );
      }
      await server.append(stream, { type: "progress", data: { pct: 50 } });
      await page.evaluate(
        ({ stream, transport }) => {
          window.got = [];
          window.messages = new window.tc.Messages();
          const c = new window.tc.TailcastClient({ transport: transport === "ws" ? "auto" : "sse" });
          c.subscribe(stream, { after: 0, compact: true }, (ev) => {
            window.got.push({ seq: ev.seq, folded: ev.folded });
            window.messages.apply(ev);
          });
          window.client = c;
        },
        { stream, transport },
      );
      await waitFor(() => page.evaluate(() => window.got.length >= 2), "the catch-up");
      // The live tail: appends arrive one by one and extend the folded message.
      await server.append(stream, { type: "msg", key: "answer", append: true, data: { text: "!" } });
      await server.append(stream, { type: "msg", key: "answer", append: true, data: { text: "?" } });
      await waitFor(() => page.evaluate(() => window.got.at(-1)?.seq === 404), "the live tail");
      const got = await page.evaluate(() => window.got);
      assert.deepEqual(got.slice(0, 2), [
        { seq: 401, folded: 401 },
        { seq: 402, folded: undefined },
      ]);
      assert.deepEqual(got.slice(2), [
        { seq: 403, folded: undefined },
        { seq: 404, folded: undefined },
      ]);
      const messages = await page.evaluate(() => window.messages.list);
      const full = await page.evaluate(async (events) => {
        const m = new window.tc.Messages();
        for (const ev of events) m.apply(ev);
        return m.list;
      }, await server.readAll(stream));
      assert.deepEqual(messages, full);
      assert.equal(messages[0].data.text, range(0, 399).map(word).join("") + "!?");
      if (transport === "sse") assert.equal(await page.evaluate(() => window.client.stats().transport), "sse");
      await page.evaluate(() => window.client.close());
    });
  }
});
