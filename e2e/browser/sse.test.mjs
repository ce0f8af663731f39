// The browser's own EventSource against a real tailcast: every event delivered once, in
// order, byte-identical to replay; a closed stream ends it for good; a server killed and
// restarted mid-stream is ridden through by EventSource alone, with Last-Event-ID.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Tailcast, WAIT_MS, freePort, launchBrowser, pageOn, uniqueStream } from './tailcast.mjs';

let server;
let browser;

before(async () => {
  server = await new Tailcast({
    port: await freePort(),
    databaseUrl: process.env.E2E_DATABASE_URL,
    // A short reconnection delay keeps the restart test quick; EventSource honours `retry:`.
    env: { TAILCAST_SSE_RETRY_MS: '200' },
  }).start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** Opens an EventSource in the page that records every message, notice, open and error. */
async function follow(page, url) {
  await page.evaluate((url) => {
    window.got = [];
    window.notices = [];
    window.opens = 0;
    const es = new EventSource(url);
    window.es = es;
    es.onopen = () => { window.opens += 1; };
    es.onmessage = (e) => window.got.push({ id: e.lastEventId, data: e.data });
    es.addEventListener('notice', (e) => window.notices.push(e.data));
  }, url);
}

async function waitForCount(page, n) {
  await page.waitForFunction((n) => window.got.length >= n, n, { timeout: WAIT_MS });
}

/** Waits until `stream.closed` has arrived; everything before it has arrived by then. */
async function waitForClosedEvent(page) {
  await page.waitForFunction(
    () => window.got.some((m) => JSON.parse(m.data).type === 'stream.closed'),
    null,
    { timeout: WAIT_MS },
  );
}

/** After `stream.closed` the response ends; the reconnect (cursor at the closed head) gets
 * 204 and EventSource gives up for good: readyState CLOSED. */
async function waitForEventSourceClosed(page) {
  await page.waitForFunction(() => window.es.readyState === EventSource.CLOSED, null, { timeout: WAIT_MS });
}

test('EventSource receives every event once, in order, byte-identical to replay, and stops at close', async () => {
  const page = await pageOn(browser.context, server);
  const stream = uniqueStream('e2e-sse');
  // Events before the subscription (catch-up from the log) and after it (live).
  const early = Array.from({ length: 150 }, (_, i) => ({
    type: 'token',
    data: { i, text: `tök ${i} ✓`, z: 1, a: [i, { nested: true }] },
    id: `early-${i}`,
  }));
  await server.append(stream, early);
  await follow(page, `/v1/streams/${stream}/sse?after=0`);
  await waitForCount(page, 150);
  for (let b = 0; b < 5; b += 1) {
    const batch = Array.from({ length: 30 }, (_, i) => ({ type: 'progress', data: { b, i }, key: `k${i % 3}` }));
    await server.append(stream, batch);
  }
  const closed = await server.close(stream, 'done');
  const total = 150 + 5 * 30 + 1;
  assert.equal(closed.last_seq, total);
  await waitForClosedEvent(page);
  const got = await page.evaluate(() => window.got);
  const replay = await server.exportLines(stream);
  assert.equal(replay.length, total);
  assert.equal(got.length, total, 'no event repeated');
  got.forEach((m, i) => {
    assert.equal(m.id, String(i + 1), 'lastEventId is the seq, in order');
    assert.equal(m.data, replay[i], `seq ${i + 1} differs from replay`);
  });
  const last = JSON.parse(got[total - 1].data);
  assert.equal(last.type, 'stream.closed');
  assert.deepEqual(last.data, { reason: 'done' });
  assert.deepEqual(await page.evaluate(() => window.notices), []);
  await waitForEventSourceClosed(page);
  assert.equal((await page.evaluate(() => window.got)).length, total, 'nothing after the end');
  await page.close();
});

/** Appends event k with id `ev-k`, retrying through a server outage (same id: no duplicate). */
async function appendThroughOutage(stream, k) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    try {
      const res = await server.append(stream, { type: 'token', data: { k }, id: `ev-${k}` });
      return res.events[0].seq;
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 25)); // retry interval while the server is down
    }
  }
}

test('EventSource rides through a server restart mid-stream with Last-Event-ID: no event missed or repeated', async () => {
  const page = await pageOn(browser.context, server);
  const stream = uniqueStream('e2e-restart');
  const N = 120;
  for (let k = 1; k <= 40; k += 1) assert.equal(await appendThroughOutage(stream, k), k);
  // `after=0` stays in the URL on every reconnect: only Last-Event-ID (which wins over it)
  // keeps the reconnected stream from replaying everything, so a repeat would show here.
  await follow(page, `/v1/streams/${stream}/sse?after=0`);
  await waitForCount(page, 40);

  // The producer goes on while the server dies and comes back.
  const producing = (async () => {
    for (let k = 41; k <= N; k += 1) assert.equal(await appendThroughOutage(stream, k), k);
  })();
  await waitForCount(page, 60);
  await server.stop('SIGKILL');
  const receivedWhileDown = await page.evaluate(() => window.got.length);
  await server.start();
  await producing;
  await server.close(stream, 'end');
  await waitForClosedEvent(page);
  const got = await page.evaluate(() => window.got);
  const opens = await page.evaluate(() => window.opens);
  assert.ok(receivedWhileDown < N, 'the server died mid-stream');
  assert.ok(opens >= 2, `EventSource reconnected by itself (opened ${opens} times)`);
  assert.equal(got.length, N + 1, 'no event missed or repeated');
  got.forEach((m, i) => {
    const env = JSON.parse(m.data);
    assert.equal(env.seq, i + 1);
    assert.equal(m.id, String(i + 1));
    if (i < N) {
      assert.equal(env.id, `ev-${i + 1}`);
      assert.deepEqual(env.data, { k: i + 1 });
    }
  });
  assert.equal(JSON.parse(got[N].data).type, 'stream.closed');
  await waitForEventSourceClosed(page);
  assert.equal((await page.evaluate(() => window.got)).length, N + 1, 'nothing after the end');
  await page.close();
});
