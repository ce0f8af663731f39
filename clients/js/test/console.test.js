// The web console in headless Chromium against a real tailcast: live tail, replay from a seq,
// answering an input request through the generated form, stop, and token entry. Screenshots
// go to e2e/artifacts/ and are checked: decoded, measured, and compared with the DOM.

import { after, afterEach, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { Server, stopAllServers, artifact, colourCount, decodePng, launchBrowser, waitFor } from "./helpers.js";

let browser;
let server;
before(async () => {
  browser = await launchBrowser();
  server = await Server.spawn();
});
after(async () => {
  await stopAllServers();
  await browser?.close();
});

/** Pages a test opened, closed after it whether it passed or not. */
const pages = [];
afterEach(async () => {
  while (pages.length) await pages.pop().close().catch(() => {});
});

async function openConsole(stream, origin = server.url) {
  const page = await browser.context.newPage();
  pages.push(page);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  page.errors = errors;
  await page.goto(`${origin}/console/${stream ? "#" + encodeURIComponent(stream) : ""}`);
  await page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: 10000 });
  return page;
}

/** Clicks the list's refresh button until `check` holds. */
async function refreshUntil(page, check, what) {
  await waitFor(async () => {
    if (await check().catch(() => false)) return true;
    await page.click("#refresh");
    return false;
  }, what);
}

const rowSeqs = (page) => page.$$eval("#events li.ev", (lis) => lis.map((li) => Number(li.dataset.seq)));

/**
 * Takes a full-page screenshot and checks it is a real rendering of the console: the
 * viewport's size, and far more colours than a blank or error page has.
 */
async function screenshot(page, name) {
  const file = artifact(name);
  await page.screenshot({ path: file, animations: "disabled" });
  const img = decodePng(readFileSync(file));
  assert.equal(img.width, 1280);
  assert.equal(img.height, 800);
  assert.ok(colourCount(img) > 40, `${name} looks blank: ${colourCount(img)} colours`);
  return img;
}

/** Share of a progress bar's track, along its middle row, painted with the fill colour. */
function filledShare(png) {
  const y = Math.floor(png.height / 2);
  let filled = 0;
  // Skip the 1px border at each end.
  for (let x = 1; x < png.width - 1; x++) {
    const [r, g, b] = png.pixel(x, y);
    // The fill is sky blue (#0ea5e9..#38bdf8) or, when complete, green; the track is near black.
    if (b > 150 || g > 150) filled++;
    else assert.ok(r < 60 && g < 60 && b < 90, `unexpected colour ${[r, g, b]} in the track`);
  }
  return filled / (png.width - 2);
}

describe("console", () => {
  test("live tail: tokens joined into text, progress as bars, screenshot matches", async () => {
    const stream = "live:tail";
    const page = await openConsole(stream);
    const words = ["Streaming", " tokens", " arrive", " one", " by", " one", " and", " read", " as", " text."];
    let text = "";
    for (const [i, w] of words.entries()) {
      // data.text and data.delta are both token deltas.
      await server.append(stream, { type: "token", data: i % 2 ? { delta: w } : { text: w } });
      text += w;
      // Each word must show before the next is appended: this is a live tail, not a reload.
      await waitFor(async () => (await page.textContent("#output-text")) === text, `text "${text}"`);
    }
    await server.append(stream, { type: "progress", key: "index", data: { current: 1, total: 4, label: "index" } });
    await server.append(stream, { type: "progress", key: "index", data: { current: 2, total: 4, label: "index" } });
    await server.append(stream, { type: "progress", key: "upload", data: { pct: 100, label: "upload" } });
    await server.append(stream, { type: "tool_call", data: { name: "search", args: { q: "tailcast" } } });
    const bar = page.locator('.bar[data-label="index"] .bar-track');
    await waitFor(async () => (await bar.getAttribute("aria-valuenow")) === "50", "index bar at 50%");
    await waitFor(async () => (await rowSeqs(page)).length === 14, "14 rows");
    assert.deepEqual(await rowSeqs(page), Array.from({ length: 14 }, (_, i) => i + 1));
    assert.equal(await page.getAttribute('.bar[data-label="upload"] .bar-track', "aria-valuenow"), "100");
    assert.equal(await page.textContent('.bar[data-label="index"] .bar-caption'), "2 / 4");

    // Other events are collapsible JSON, built when opened.
    const toolRow = page.locator('#events li[data-seq="14"]');
    assert.equal(await toolRow.locator("pre").count(), 0);
    await toolRow.locator("summary").click();
    assert.deepEqual(JSON.parse(await toolRow.locator("pre").textContent()).data, { name: "search", args: { q: "tailcast" } });

    await screenshot(page, "console-live-tail.png");
    // The bar as painted, not only as the DOM says: half of the track is filled.
    const share = filledShare(decodePng(await bar.screenshot({ animations: "disabled" })));
    assert.ok(Math.abs(share - 0.5) < 0.03, `index bar painted ${Math.round(share * 100)}% full`);
    const full = filledShare(decodePng(await page.locator('.bar[data-label="upload"] .bar-track').screenshot({ animations: "disabled" })));
    assert.ok(full > 0.97, `upload bar painted ${Math.round(full * 100)}% full`);
    // The text pane shows the joined text (rendered, so it has glyphs: many colours).
    const textPng = decodePng(await page.locator("#output-text").screenshot());
    assert.ok(colourCount(textPng) > 4, "the output pane shows no text");
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test("replay from a seq, then live again", async () => {
    const stream = "replay:from";
    await server.append(stream, Array.from({ length: 30 }, (_, i) => ({ type: "step", data: { i: i + 1 } })));
    const page = await openConsole(stream);
    await waitFor(async () => (await rowSeqs(page)).length === 30, "30 rows");
    await page.fill("#replay-seq", "25");
    await page.click("#replay-btn");
    await waitFor(async () => (await rowSeqs(page))[0] === 25, "the replay to start at 25");
    await waitFor(async () => (await rowSeqs(page)).length === 6, "rows 25..30");
    assert.deepEqual(await rowSeqs(page), [25, 26, 27, 28, 29, 30]);
    assert.equal(await page.textContent("#stream-status"), "replay from 25");
    await server.append(stream, { type: "step", data: { i: 31 } });
    await waitFor(async () => (await rowSeqs(page)).length === 7, "the live event after the replay");
    assert.deepEqual(await rowSeqs(page), [25, 26, 27, 28, 29, 30, 31]);
    assert.equal(await page.textContent("#stream-cursor"), "31");
    await screenshot(page, "console-replay.png");
    // What was captured is what the test asserted: the DOM still shows 25..31.
    assert.deepEqual(await rowSeqs(page), [25, 26, 27, 28, 29, 30, 31]);

    await page.fill("#replay-seq", "0");
    await page.click("#replay-btn");
    await waitFor(async () => (await page.textContent("#banner")).includes("seq of 1 or more"), "a clear message for seq 0");
    await page.close();
  });

  test("answer an input request through the form generated from its schema", async () => {
    const stream = "ask:deploy";
    await server.append(stream, [
      { type: "token", data: { text: "I am ready to deploy build 512 to production." } },
      { type: "progress", key: "checks", data: { current: 7, total: 8, label: "checks" } },
    ]);
    const schema = {
      type: "object",
      properties: {
        approve: { type: "boolean", title: "Approve" },
        comment: { type: "string", title: "Comment", description: "Why" },
        region: { enum: ["eu-west", "us-east"], title: "Region" },
        replicas: { type: "integer", minimum: 1, maximum: 9, title: "Replicas" },
        labels: { type: "array", items: { type: "string" }, title: "Labels" },
      },
      required: ["approve", "comment", "region"],
    };
    const created = await server.fetch("POST", `/v1/streams/${stream}/inputs`, {
      request_id: "deploy-512",
      prompt: "Deploy build 512 to production?",
      schema,
      timeout_ms: 600000,
    });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const page = await openConsole(stream);
    const card = page.locator('.input-card[data-request-id="deploy-512"]');
    await card.waitFor({ timeout: 10000 });
    assert.equal(await card.locator("header strong").textContent(), "Deploy build 512 to production?");
    // One control per property, of the right kind; what the schema cannot map is raw JSON.
    assert.equal(await card.locator('input[type="checkbox"][name="approve"]').count(), 1);
    assert.equal(await card.locator('input[type="text"][name="comment"][required]').count(), 1);
    assert.deepEqual(await card.locator('select[name="region"] option').allTextContents(), ["eu-west", "us-east"]);
    assert.equal(await card.locator('input[type="number"][name="replicas"][step="1"]').count(), 1);
    assert.equal(await card.locator('textarea.raw-json[name="labels"]').count(), 1);

    // A required field left empty is refused in the form, before anything is sent.
    await card.locator("button[type=submit]").click();
    await waitFor(async () => /Comment/.test(await card.locator(".form-error").textContent()), "the missing-field message");
    // Bad JSON in the raw field is refused with a clear message too.
    await card.locator('[name="comment"]').fill("green across the board");
    await card.locator('[name="labels"]').fill("[not json");
    await card.locator("button[type=submit]").click();
    await waitFor(async () => /Labels: not valid JSON/.test(await card.locator(".form-error").textContent()), "the JSON message");

    await card.locator('[name="approve"]').check();
    await card.locator('[name="region"]').selectOption({ label: "us-east" });
    await card.locator('[name="replicas"]').fill("3");
    await card.locator('[name="labels"]').fill('["canary", "eu"]');
    await screenshot(page, "console-input-form.png");
    await card.locator("button[type=submit]").click();

    const answeredRow = page.locator('#events li[data-type="input.answered"]');
    await answeredRow.waitFor({ timeout: 10000 });
    assert.match(await answeredRow.locator(".desc").textContent(), /deploy-512/);
    // The card stays, the form replaced by the outcome: the answer and when it was given.
    await waitFor(async () => (await card.getAttribute("data-status")) === "answered", "the card marked answered");
    assert.equal(await card.locator("form").count(), 0);
    assert.equal(await card.locator(".outcome .pill").textContent(), "answered");
    assert.match(await card.locator(".outcome .muted").textContent(), /seq 4$/);
    const events = await server.readAll(stream);
    const answered = events.filter((e) => e.type === "input.answered");
    assert.equal(answered.length, 1);
    assert.equal(answered[0].data.request_id, "deploy-512");
    assert.deepEqual(answered[0].data.data, {
      approve: true,
      comment: "green across the board",
      region: "us-east",
      replicas: 3,
      labels: ["canary", "eu"],
    });
    assert.deepEqual(JSON.parse(await card.locator(".outcome .answer").textContent()), answered[0].data.data);
    await screenshot(page, "console-input-answered.png");
    assert.equal(await page.locator("#inputs").isVisible(), true);
    assert.equal(await card.isVisible(), true);
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test("stop appends control.stop with the reason", async () => {
    const stream = "stop:me";
    await server.append(stream, { type: "token", data: { text: "working…" } });
    const page = await openConsole(stream);
    await waitFor(async () => (await rowSeqs(page)).length === 1, "the first row");
    await page.fill("#stop-reason", "user cancelled");
    await page.click("#stop-btn");
    const stopRow = page.locator('#events li[data-type="control.stop"]');
    await stopRow.waitFor({ timeout: 10000 });
    assert.equal(await stopRow.locator(".desc").textContent(), "stop requested: user cancelled");
    const events = await server.readAll(stream);
    assert.deepEqual(
      events.map((e) => e.type),
      ["token", "control.stop"],
    );
    assert.equal(events[1].data.reason, "user cancelled");
    await waitFor(async () => /Stop sent/.test(await page.textContent("#banner")), "the confirmation");
    assert.equal(await stopRow.locator(".stop-status").textContent(), "waiting");
    await screenshot(page, "console-stop.png");

    // The agent acknowledges (the stop-acknowledgement convention): the row and the banner say
    // the stop took effect.
    await server.append(stream, { type: "control.stopped", data: { stop_seq: events[1].seq } });
    await waitFor(async () => (await stopRow.locator(".stop-status").textContent()) === "stopped", "the stop marked stopped");
    await waitFor(async () => /The agent stopped/.test(await page.textContent("#banner")), "the acknowledgement banner");
    const answerRow = page.locator('#events li[data-type="control.stopped"] .desc');
    assert.equal(await answerRow.textContent(), `stopped (answering stop #${events[1].seq})`);

    // Close, after a confirmation: Stop and Close are then disabled, with no error shown.
    const dialogs = [];
    page.on("dialog", (d) => {
      dialogs.push(d.message());
      d.accept();
    });
    await page.click("#close-btn");
    await waitFor(async () => (await page.textContent("#stream-status")) === "closed", "the closed status");
    assert.match(dialogs[0], /^Close stop:me\?/);
    assert.equal(await page.isDisabled("#stop-btn"), true);
    assert.equal(await page.isDisabled("#close-btn"), true);
    assert.equal(await page.isVisible("#banner.error"), false, await page.textContent("#banner"));
    assert.deepEqual((await server.readAll(stream)).map((e) => e.type), ["token", "control.stop", "control.stopped", "stream.closed"]);
    await screenshot(page, "console-closed.png");

    // Delete, after a confirmation: the stream is gone, from the server and the list.
    await page.click("#delete-btn");
    await waitFor(async () => (await page.textContent("#stream-status")) === "deleted", "the deleted status");
    assert.match(dialogs[1], /^Delete stop:me and all its events\?/);
    assert.equal((await server.fetch("GET", `/v1/streams/${stream}`)).status, 404);
    await waitFor(async () => (await page.$$('#streams li[data-stream="stop:me"]')).length === 0, "the stream gone from the list");
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test("list and filter streams, and see a closed one end", async () => {
    await server.append("filter:alpha", { type: "m", data: 1 });
    await server.append("filter:beta", { type: "m", data: 1 });
    await server.append("other:gamma", { type: "m", data: 1 });
    await server.fetch("POST", "/v1/streams/filter:beta/close", { reason: "done" });
    const page = await openConsole();
    const names = () => page.$$eval("#streams li[data-stream]", (lis) => lis.map((li) => li.dataset.stream));
    await waitFor(async () => (await names()).includes("other:gamma"), "the stream list");
    await page.fill("#filter", "filter:");
    await waitFor(async () => (await names()).join() === "filter:alpha,filter:beta", "the prefix filter");
    await page.check("#hide-closed");
    await waitFor(async () => (await names()).join() === "filter:alpha", "closed streams hidden");
    await page.uncheck("#hide-closed");
    await waitFor(async () => (await names()).length === 2, "closed streams back");
    await page.click('#streams li[data-stream="filter:beta"] a');
    await waitFor(async () => (await page.textContent("#stream-status")) === "closed", "the closed status");
    // The status can come from the stream's metadata before its events have been rendered.
    await waitFor(async () => (await rowSeqs(page)).length >= 2, "the closed stream's events");
    assert.deepEqual(await rowSeqs(page), [1, 2]);
    // Nothing to stop or close on a closed stream: the buttons say so before anyone clicks.
    assert.equal(await page.isDisabled("#stop-btn"), true);
    assert.equal(await page.isDisabled("#close-btn"), true);
    // Each stream shows its last activity.
    assert.match(await page.textContent('#streams li[data-stream="filter:alpha"] .when'), /^\d+ s ago$/);
    assert.equal(await page.locator('#events li[data-type="stream.closed"] .desc').textContent(), "stream closed: done");
    await page.fill("#filter", "nothing-here:");
    await waitFor(async () => /No stream starts with/.test(await page.textContent("#streams")), "the empty-list message");
    await page.close();
  });

  test("the stream list shows how many follow each stream now", async () => {
    await server.append("subs:a", { type: "m", data: 1 });
    await server.append("subs:b", { type: "m", data: 1 });
    const subs = (page, stream) => page.textContent(`#streams li[data-stream="${stream}"] .subs`);
    // The console following subs:a is one of its followers.
    const first = await openConsole("subs:a");
    await refreshUntil(first, async () => (await subs(first, "subs:a")) === "1" && (await subs(first, "subs:b")) === "0", "one follower of subs:a");
    const second = await openConsole("subs:a");
    await refreshUntil(first, async () => (await subs(first, "subs:a")) === "2", "two followers of subs:a");
    assert.equal(await first.getAttribute('#streams li[data-stream="subs:a"] .subs', "title"), "2 following now");
    await screenshot(first, "console-subscribers.png");
    await second.close();
    await refreshUntil(first, async () => (await subs(first, "subs:a")) === "1", "the second follower gone");
    assert.deepEqual(first.errors, []);
  });

  test("pace: tokens per second, time to first token and last activity of the followed stream", async () => {
    const stream = "pace:run";
    await server.append(stream, { type: "status", data: "thinking" });
    const page = await openConsole(stream);
    assert.equal(await page.textContent("#pace-rate"), "–");
    assert.equal(await page.textContent("#pace-ttft"), "–");
    for (let i = 0; i < 8; i++) {
      await server.append(stream, { type: "token", data: { text: `t${i} ` } });
    }
    await waitFor(async () => (await rowSeqs(page)).length === 9, "9 rows");
    await waitFor(async () => /^\d+\.\d$/.test(await page.textContent("#pace-rate")), "a token rate");
    assert.ok(Number(await page.textContent("#pace-rate")) > 0);
    assert.match(await page.textContent("#pace-ttft"), /^\d+\.\d\d s$/);
    assert.match(await page.textContent("#pace-last"), /^\d+ s ago$/);
    await screenshot(page, "console-pace.png");
    assert.deepEqual(page.errors, []);
    await page.close();
  });

  test("token entry: 401 explained, then the token is sent as a header and as ?token=", async () => {
    const admin = "console-admin-token";
    const secret = "console-jwt-secret";
    const secure = await Server.spawn({ env: { TAILCAST_ADMIN_TOKEN: admin, TAILCAST_JWT_SECRET: secret } });
    try {
      const auth = { authorization: `Bearer ${admin}` };
      await secure.append("secure:run", { type: "token", data: { text: "for your eyes only" } }, auth);
      const page = await openConsole("secure:run", secure.url);
      const seen = [];
      page.on("request", (r) => seen.push({ url: r.url(), authorization: r.headers().authorization }));
      page.on("websocket", (ws) => seen.push({ url: ws.url(), websocket: true }));

      await waitFor(async () => /Unauthorized \(401\)/.test(await page.textContent("#banner")), "the 401 message");
      assert.match(await page.textContent("#banner"), /needs a valid token\. Enter one/);
      assert.equal(await page.isVisible("#banner"), true);
      assert.equal(await page.locator("#events li").count(), 0, "nothing shown without a token");
      await screenshot(page, "console-auth-401.png");

      // A wrong token is refused just as clearly.
      await page.fill("#token", "not-a-token");
      await page.click("#token-save");
      await waitFor(async () => /Unauthorized \(401\)/.test(await page.textContent("#banner")), "401 for a bad token");

      await page.fill("#token", admin);
      seen.length = 0;
      await page.click("#token-save");
      await waitFor(async () => (await page.textContent("#output-text")) === "for your eyes only", "the stream, with the token");
      assert.equal(await page.isVisible("#banner.error"), false, await page.textContent("#banner"));
      await waitFor(async () => (await page.$$("#streams li[data-stream]")).length === 1, "the stream list");
      const rest = seen.filter((r) => !r.websocket && r.url.includes("/v1/") && !r.url.includes("/sse"));
      assert.ok(rest.length > 0);
      for (const r of rest) assert.equal(r.authorization, `Bearer ${admin}`, r.url);
      // EventSource and browser WebSockets cannot set headers: the token rides in the URL.
      const live = seen.filter((r) => r.websocket || r.url.includes("/sse"));
      assert.ok(live.length > 0, "a live connection was made");
      for (const r of live) assert.equal(new URL(r.url).searchParams.get("token"), admin, r.url);
      for (const r of seen) assert.ok(!r.url.includes(admin) || r.websocket || r.url.includes("/sse"), `token leaked into ${r.url}`);
      await screenshot(page, "console-auth-ok.png");
      assert.equal(await page.isVisible("#banner.error"), false, "the screenshot shows no error");

      // The token lasts for the tab's session (not in localStorage, not in the URL).
      await page.reload();
      await page.waitForFunction(() => document.body.dataset.ready === "1");
      await waitFor(async () => (await page.textContent("#output-text")) === "for your eyes only", "the stream after a reload");
      assert.equal(await page.evaluate(() => localStorage.length), 0);

      // A token without the grant for an action gets a 403 that says so.
      const reader = jwt(secret, { sub: "viewer", exp: Math.floor(Date.now() / 1000) + 600, read: ["secure:*"] });
      await page.fill("#token", reader);
      await page.click("#token-save");
      await waitFor(async () => (await page.textContent("#output-text")) === "for your eyes only", "the stream for a reader");
      await page.click("#stop-btn");
      await waitFor(async () => /Forbidden \(403\) while sending stop/.test(await page.textContent("#banner")), "the 403 message");
      assert.match(await page.textContent("#streams"), /may not list all streams/);
      assert.equal((await secure.readAll("secure:run", auth)).length, 1, "nothing was appended");
      await page.close();
    } finally {
      await secure.stop();
    }
  });
});

/** An HS256 JWT, as a token issuer would mint it. */
function jwt(secret, claims) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

describe("console: long streams", () => {
  test("a long answer opens compacted: one row per message, the same text, then the live tail", async () => {
    const stream = "long:answer";
    const words = Array.from({ length: 600 }, (_, i) => ` w${i}`);
    await server.append(stream, { type: "token", key: "answer", data: { text: "" } });
    for (let b = 0; b < words.length; b += 200) {
      await server.append(
        stream,
        words.slice(b, b + 200).map((w) => ({ type: "token", key: "answer", append: true, data: { text: w } })),
      );
    }
    await server.append(stream, { type: "progress", key: "index", data: { pct: 40, label: "index" } });
    const page = await openConsole(stream);
    const text = words.join("");
    await waitFor(async () => (await page.textContent("#output-text")) === text, "the whole answer's text");
    await waitFor(async () => (await rowSeqs(page)).length === 2, "two rows");
    assert.deepEqual(await rowSeqs(page), [601, 602]);
    assert.equal(await page.textContent('#events li[data-seq="601"] .folded'), "×601");
    // The live tail arrives event by event.
    await server.append(stream, { type: "token", key: "answer", append: true, data: { text: "!" } });
    await waitFor(async () => (await page.textContent("#output-text")) === text + "!", "the live token");
    assert.deepEqual(await rowSeqs(page), [601, 602, 603]);
    assert.equal(await page.locator('#events li[data-seq="603"] .folded').count(), 0);
    await screenshot(page, "console-compacted.png");
    assert.deepEqual(page.errors, []);
  });
});
