// The Durable Streams server conformance suite, unchanged, against the tailcast at
// CONFORMANCE_TEST_URL (started by ./run with a short --ds-long-poll-ms).
import { runConformanceTests } from "@durable-streams/server-conformance-tests"

const baseUrl = process.env.CONFORMANCE_TEST_URL
if (!baseUrl) throw new Error("CONFORMANCE_TEST_URL is not set (use e2e/durable-streams/run)")

runConformanceTests({
  baseUrl,
  longPollTimeoutMs: Number(process.env.CONFORMANCE_LONG_POLL_MS ?? 20000),
})
