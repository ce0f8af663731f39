// The browser's own WebSocket against a real tailcast: welcome, subscribe, publish, events
// from another producer, ping, and a bad frame answered with an error op on a live connection.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { Tailcast, WAIT_MS, freePort, launchBrowser, pageOn, uniqueStream } from './tailcast.mjs';

let server;
let browser;

before(async () => {
  server = await new Tailcast({ port: await freePort(), databaseUrl: process.env.E2E_DATABASE_URL }).start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

/** Opens a WebSocket in the page; every frame it receives lands in window.frames. */
async function connect(page) {
  await page.evaluate(() => new Promise((resolve, reject) => {
    window.frames_ = [];
    const ws = new WebSocket(`${location.origin.replace('http', 'ws')}/v1/ws`);
    window.ws = ws;
    ws.onmessage = (e) => window.frames_.push(JSON.parse(e.data));
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error('WebSocket failed to open'));
  }));
}

const send = (page, op) => page.evaluate((op) => window.ws.send(JSON.stringify(op)), op);

/** Waits for the first frame matching `pred` (a function source over `f`) and returns it. */
async function frame(page, pred) {
  const handle = await page.waitForFunction(
    (pred) => window.frames_.find(new Function('f', `return ${pred};`)),
    pred,
    { timeout: WAIT_MS },
  );
  return handle.jsonValue();
}

test('browser WebSocket: subscribe, publish, receive events from any producer, ping, errors', async () => {
  const page = await pageOn(browser.context, server);
  const stream = uniqueStream('e2e-ws');
  await server.append(stream, [{ type: 'token', data: 'before' }]);
  await connect(page);

  const welcome = await frame(page, "f.op === 'welcome'");
  assert.equal(welcome.protocol, 1);
  assert.ok(welcome.connection_id);
  assert.ok(welcome.heartbeat_ms > 0);

  await send(page, { op: 'subscribe', stream, after: 0, ref: 'sub' });
  const subscribed = await frame(page, "f.ref === 'sub'");
  assert.deepEqual([subscribed.op, subscribed.stream, subscribed.head], ['subscribed', stream, 1]);

  await send(page, { op: 'publish', stream, events: [{ type: 'token', data: { text: 'from the browser' }, id: 'b1' }], ref: 'pub' });
  const ack = await frame(page, "f.ref === 'pub'");
  assert.equal(ack.op, 'ack');
  assert.equal(ack.first_seq, 2);
  assert.deepEqual(ack.events, [{ seq: 2, id: 'b1' }]);

  // Publishing the same id again is acknowledged as a duplicate, not appended.
  await send(page, { op: 'publish', stream, events: [{ type: 'token', data: { text: 'from the browser' }, id: 'b1' }], ref: 'again' });
  const again = await frame(page, "f.ref === 'again'");
  assert.deepEqual(again.events, [{ seq: 2, id: 'b1', duplicate: true }]);

  await server.append(stream, { type: 'token', data: 'from REST' });
  await frame(page, "f.op === 'event' && f.seq === 3");

  await send(page, { op: 'ping', ref: 'p' });
  const pong = await frame(page, "f.ref === 'p'");
  assert.equal(pong.op, 'pong');
  assert.ok(!Number.isNaN(Date.parse(pong.time)));

  await send(page, { op: 'no-such-op', ref: 'bad' });
  const bad = await frame(page, "f.ref === 'bad'");
  assert.equal(bad.op, 'error');
  assert.ok(bad.code, 'the error op has a code');
  await page.evaluate(() => window.ws.send('not json'));
  await send(page, { op: 'publish', stream, events: [{ type: 'stream.closed', data: {} }], ref: 'reserved' });
  const reserved = await frame(page, "f.ref === 'reserved'");
  assert.equal(reserved.code, 'reserved_type');
  assert.equal(await page.evaluate(() => window.ws.readyState), 1, 'the connection stays open after bad frames');

  // Events arrive once each, in order, and equal the replay's envelopes.
  const events = await page.evaluate(() => window.frames_.filter((f) => f.op === 'event'));
  assert.deepEqual(events.map((e) => e.seq), [1, 2, 3]);
  const replay = (await server.exportLines(stream)).map((l) => JSON.parse(l));
  assert.deepEqual(events.map(({ op, ...env }) => env), replay);

  await send(page, { op: 'unsubscribe', stream, ref: 'unsub' });
  const unsub = await frame(page, "f.ref === 'unsub'");
  assert.deepEqual([unsub.op, unsub.stream], ['unsubscribed', stream]);
  await page.close();
});
