"""Retries never duplicate: answers lost after the server appended (a proxy drops the
connection after forwarding), 503s, a real 429 from tailcast's rate limit, and a kill -9."""

from __future__ import annotations

import asyncio
import time

import pytest

import tailcast
from tailcast import AsyncTailcast, RetryPolicy, Tailcast

from proxy import Proxy

FAST = RetryPolicy(attempts=8, base_delay=0.02, max_delay=0.2)


@pytest.fixture
def proxy(server):
    p = Proxy(server.port)
    yield p
    p.close()


def test_a_lost_answer_is_resent_with_the_same_id_and_not_doubled(tc, proxy, stream):
    proxy.drop_after_forward = 3
    with Tailcast(proxy.url, retry=FAST) as via:
        res = via.append(stream, "token", {"text": "once"})
    # The server appended it on the first try; the three resends found the same id.
    assert [f[2] for f in proxy.forwarded] == ["dropped"] * 3 + ["answered"]
    assert res.seq == 1 and res.duplicate
    assert [(e.seq, e.data) for e in tc.read(stream)] == [(1, {"text": "once"})]


def test_the_writer_through_a_lossy_connection_delivers_each_token_once_in_order(tc, proxy, stream):
    proxy.drop_every = 2  # every other request's answer is lost
    with Tailcast(proxy.url, retry=FAST) as via:
        with via.writer(stream, max_events=20) as w:
            for i in range(300):
                w.write("token", {"i": i})
        assert via.retries == sum(1 for f in proxy.forwarded if f[2] == "dropped") >= 5
    got = list(tc.read(stream))
    assert [(e.seq, e.data["i"]) for e in got] == [(i + 1, i) for i in range(300)]


def test_503_is_retried_and_nothing_was_stored_by_it(tc, proxy, stream):
    proxy.fail_503 = 2
    with Tailcast(proxy.url, retry=FAST) as via:
        res = via.append_many(stream, [("a", 1), ("b", 2)])
    assert [f[2] for f in proxy.forwarded] == ["503", "503", "answered"]
    assert (res.first_seq, res.last_seq, res.duplicate) == (1, 2, False)
    proxy.fail_503 = 100
    with Tailcast(proxy.url, retry=RetryPolicy(attempts=3, base_delay=0.01)) as via:
        with pytest.raises(tailcast.Unavailable):
            via.append(stream, "c", 3)


def test_outcome_unknown_is_resent_only_with_idempotency_ids(tc, proxy, stream):
    proxy.fail_503, proxy.code_503 = 1, "outcome_unknown"
    with Tailcast(proxy.url, retry=FAST) as via:
        assert via.append(stream, "token", 1).seq == 1  # resent with the same id
        proxy.fail_503 = 1
        with pytest.raises(tailcast.OutcomeUnknown):
            via.stop(stream, "once")  # no id: resending could double it
    assert [f[2] for f in proxy.forwarded] == ["503", "answered", "503"]


def test_requests_without_an_id_are_not_resent_after_an_ambiguous_failure(tc, proxy, stream):
    tc.append(stream, "token", 1)
    proxy.drop_after_forward = 1
    with Tailcast(proxy.url, retry=FAST) as via:
        with pytest.raises(tailcast.TransportError):
            via.stop(stream, "once")
    # Forwarded once, answer lost, not sent again: exactly one control.stop.
    assert [e.type for e in tc.read(stream)] == ["token", "control.stop"]


def test_async_retries_do_not_duplicate(tc, proxy, stream):
    async def main():
        proxy.drop_after_forward = 2
        async with AsyncTailcast(proxy.url, retry=FAST) as via:
            res = await via.append(stream, "token", {"text": "once"})
            assert res.duplicate and res.seq == 1
            proxy.fail_503 = 1
            assert (await via.append(stream, "token", {"text": "twice"})).seq == 2

    asyncio.run(main())
    assert [e.data["text"] for e in tc.read(stream)] == ["once", "twice"]


def test_429_from_the_rate_limit_waits_for_retry_after(make_server, stream):
    srv = make_server("--publish-rate", "1", "--publish-burst", "1")
    with Tailcast(srv.url) as tc:
        started = time.monotonic()
        seqs = [tc.append(stream, "token", {"i": i}).seq for i in range(3)]
        took = time.monotonic() - started
        assert seqs == [1, 2, 3]
        limited = srv.metric("tailcast_http_requests_total", status="429")
        assert limited >= 1
        # Each refusal said Retry-After: 1 and was honoured (no hammering in between).
        assert limited <= 4, limited
        assert took >= 1.0 * min(limited, 2) - 0.05, (took, limited)
        assert [e.data["i"] for e in tc.read(stream)] == [0, 1, 2]


def test_a_kill_9_during_appends_loses_and_doubles_nothing(make_server, stream):
    srv = make_server()
    patient = RetryPolicy(attempts=200, base_delay=0.05, max_delay=0.3)
    with Tailcast(srv.url, retry=patient) as tc:
        w = tc.writer(stream, max_events=25, linger=0.001)
        for i in range(200):
            w.write("token", {"i": i})
        # Requests are in flight now: kill the server under them and start it again.
        srv.kill9()
        srv.start()
        for i in range(200, 400):
            w.write("token", {"i": i})
        w.close()
        assert tc.retries >= 1  # something was cut off or refused, and sent again
        got = list(tc.read(stream))
        assert [(e.seq, e.data["i"]) for e in got] == [(i + 1, i) for i in range(400)]
