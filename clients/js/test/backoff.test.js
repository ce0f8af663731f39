// The reconnect delay rule, at its limits (the restart tests check it end to end).

import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay } from "../tailcast.js";

test("delays double from the initial one, are capped, and are jittered in [cap/2, cap]", () => {
  const opts = { initialMs: 100, maxMs: 1000 };
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((a) => backoffDelay(a, opts, () => 1)), [100, 200, 400, 800, 1000, 1000]);
  assert.deepEqual([0, 1, 2, 3, 4, 10].map((a) => backoffDelay(a, opts, () => 0)), [50, 100, 200, 400, 500, 500]);
  assert.equal(backoffDelay(2, opts, () => 0.5), 300);
  // Defaults: 250 ms doubling to 15 s.
  assert.equal(backoffDelay(0, {}, () => 1), 250);
  assert.equal(backoffDelay(100, {}, () => 1), 15000);
});

test("two clients dropped together do not retry in lockstep", () => {
  const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(5, { initialMs: 100, maxMs: 10000 })));
  assert.ok(delays.size > 25, `only ${delays.size} distinct delays out of 50`);
  for (const d of delays) assert.ok(d >= 1600 && d <= 3200, `${d}`);
});
