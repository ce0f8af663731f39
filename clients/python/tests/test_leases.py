"""Stop acknowledgement (the agent answers a stop; the sender learns whether it took effect)
and leases (heartbeats keep a stream open; silence closes it as abandoned), blocking and
asyncio, against a real server."""

from __future__ import annotations

import asyncio
import time

import pytest

import tailcast
from tailcast import AsyncTailcast


def test_the_agent_acknowledges_or_refuses_a_stop_and_the_sender_sees_it(tc, stream):
    tc.append(stream, "token", {"text": "working"})
    with tc.watch_stop(stream) as watch:
        stop = tc.stop(stream, "enough")
        assert watch.wait(20), watch.error
        watch.ack({"tokens": 1})
    outcome = tc.wait_stop_outcome(stream, stop.seq, timeout=20)
    assert outcome.outcome == "stopped" and outcome.took_effect
    assert outcome.event.type == tailcast.CONTROL_STOPPED
    assert outcome.event.data == {"tokens": 1, "stop_seq": stop.seq}

    second = tc.stop(stream)
    tc.refuse_stop(stream, second.seq, "deploy half done")
    refused = tc.wait_stop_outcome(stream, second.seq, timeout=20)
    assert refused.outcome == "refused" and not refused.took_effect
    assert refused.event.data == {"stop_seq": second.seq, "reason": "deploy half done"}

    # Nobody answers: a timeout, not a hang.
    third = tc.stop(stream)
    started = time.monotonic()
    assert tc.wait_stop_outcome(stream, third.seq, timeout=0.3) == tailcast.StopOutcome("timeout")
    assert time.monotonic() - started < 10

    types = [e.type for e in tc.read(stream)]
    assert types == [
        "token",
        "control.stop",
        "control.stopped",
        "control.stop",
        "control.stop_refused",
        "control.stop",
    ]


def test_heartbeats_keep_a_lease_and_silence_closes_the_stream_as_abandoned(tc, stream):
    tc.append(stream, "token", {"text": "start"})
    info = tc.set_lease(stream, 2)
    assert info["lease_s"] == 2 and info["lease_expires_at"] is not None
    # Two lease periods of heartbeats: still open.
    until = time.monotonic() + 4
    while time.monotonic() < until:
        assert tc.heartbeat(stream)["closed"] is False
        time.sleep(0.2)
    stop = tc.stop(stream)
    # Then silence: closed as abandoned, which is also the pending stop's outcome.
    outcome = tc.wait_stop_outcome(stream, stop.seq, timeout=20)
    assert outcome.outcome == "closed" and outcome.took_effect
    assert outcome.event.data["reason"] == "abandoned"
    with pytest.raises(tailcast.StreamClosed):
        tc.heartbeat(stream)
    closes = [e for e in tc.read(stream) if e.type == tailcast.STREAM_CLOSED]
    assert len(closes) == 1


def test_asyncio_agent_acknowledges_a_stop(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as tc:
            await tc.append(stream, "token", {"i": 0})
            await tc.set_lease(stream, 60)
            assert (await tc.heartbeat(stream))["lease_s"] == 60
            async with tc.watch_stop(stream) as watch:
                stop = await tc.stop(stream, "enough")
                await asyncio.wait_for(watch.wait(), 20)
                await watch.ack()
            outcome = await tc.wait_stop_outcome(stream, stop.seq, timeout=20)
            assert outcome.outcome == "stopped"
            assert (await tc.set_lease(stream, None))["lease_s"] is None

    asyncio.run(main())
