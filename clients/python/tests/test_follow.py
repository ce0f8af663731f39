"""follow over SSE: exactly once and in order through a kill -9 and restart, notices as
typed exceptions, the `retry:` trap, and stop reaching the agent."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

import tailcast
from tailcast import AsyncTailcast, RetryPolicy, SSEParser, Tailcast

from conftest import wait_for


def test_follow_from_a_cursor_ends_after_stream_closed(tc, stream):
    tc.append_many(stream, [("token", {"i": i}) for i in range(5)])
    tc.close(stream, "done")
    got = list(tc.follow(stream, after=2))
    assert [(e.seq, e.type) for e in got] == [(3, "token"), (4, "token"), (5, "token"), (6, "stream.closed")]
    assert got[-1].data == {"reason": "done"} and got[0].stream == stream
    # At the closed stream's head: nothing more, ever (the server answers 204).
    assert list(tc.follow(stream, after=6)) == []


def test_follow_with_types_sees_only_those_and_still_ends(tc, stream):
    tc.append_many(stream, [("token", 1), ("progress", 2), ("token", 3)])
    tc.close(stream)
    f = tc.follow(stream, types=["progress"])
    assert [(e.seq, e.type) for e in f] == [(2, "progress"), (4, "stream.closed")]
    assert f.cursor == 4


def test_live_events_arrive_exactly_once_in_order(tc, stream):
    got = []
    f = tc.follow(stream)

    def consume():
        for ev in f:
            got.append(ev.seq)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(20):
        tc.append(stream, "token", {"i": i})
    tc.close(stream)
    t.join(30)
    assert not t.is_alive()
    assert got == list(range(1, 22))


def run_followers(url: str, stream: str):
    """A blocking and an asyncio follower, each in its own thread, collecting seqs."""
    sync_got, async_got, errors = [], [], []

    def sync_follow():
        try:
            with Tailcast(url) as c:
                for ev in c.follow(stream):
                    sync_got.append((ev.seq, ev.type, ev.data))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def async_follow():
        async def main():
            async with AsyncTailcast(url) as c:
                async for ev in c.follow(stream):
                    async_got.append((ev.seq, ev.type, ev.data))

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=sync_follow), threading.Thread(target=async_follow)]
    for t in threads:
        t.start()
    return sync_got, async_got, errors, threads


def test_follow_through_kill_9_and_restart_loses_and_repeats_nothing(make_server, stream):
    srv = make_server()
    patient = RetryPolicy(attempts=200, base_delay=0.05, max_delay=0.3)
    with Tailcast(srv.url, retry=patient) as tc:
        tc.append(stream, "token", {"i": 0})
        sync_got, async_got, errors, threads = run_followers(srv.url, stream)
        w = tc.writer(stream, max_events=10, linger=0.001)
        for i in range(1, 150):
            w.write("token", {"i": i})
        wait_for(lambda: len(sync_got) >= 50 and len(async_got) >= 50, 30, "followers to get going")
        srv.kill9()
        for i in range(150, 200):
            w.write("token", {"i": i})  # queued and retried while the server is down
        srv.start()
        for i in range(200, 300):
            w.write("token", {"i": i})
        w.close()
        tc.close(stream, "done")
        for t in threads:
            t.join(60)
        assert not errors, errors
        expected = [(i + 1, "token", {"i": i}) for i in range(300)] + [(301, "stream.closed", {"reason": "done"})]
        assert sync_got == expected
        assert async_got == expected


def test_a_gap_raises_stream_gap_with_the_oldest_seq(tc, server, stream):
    tc.append_many(stream, [("token", i) for i in range(10)])
    r = httpx.put(f"{server.url}/v1/streams/{stream}/retention", json={"max_events": 3}, timeout=10)
    assert r.status_code == 200, r.text
    wait_for(lambda: tc.info(stream)["oldest_seq"] == 8, 20, "retention to trim the stream")
    with pytest.raises(tailcast.StreamGap) as e:
        next(iter(tc.follow(stream, after=2)))
    assert e.value.oldest == 8 and e.value.stream == stream
    # Continuing past the gap is the caller's decision: follow again from just before it.
    assert [ev.seq for ev in tc.read(stream, after=e.value.oldest - 1)] == [8, 9, 10]


def test_a_cursor_past_the_head_raises_stream_reset(tc, stream):
    tc.append_many(stream, [("token", 1), ("token", 2)])
    with pytest.raises(tailcast.StreamReset) as e:
        for _ in tc.follow(stream, after=50):
            pass
    assert e.value.head == 2

    async def main():
        async with AsyncTailcast(tc.base_url) as c:
            with pytest.raises(tailcast.StreamReset):
                async for _ in c.follow(stream, after=50):
                    pass

    asyncio.run(main())


def test_a_deleted_stream_raises_stream_deleted(tc, server, stream):
    tc.append(stream, "token", 1)
    errors = []
    seen = []

    def consume():
        try:
            for ev in tc.follow(stream):
                seen.append(ev.seq)
        except tailcast.StreamDeleted as e:
            errors.append(e)

    t = threading.Thread(target=consume)
    t.start()
    wait_for(lambda: seen == [1], 20, "the first event")
    assert httpx.delete(f"{server.url}/v1/streams/{stream}", timeout=10).status_code == 204
    t.join(20)
    assert len(errors) == 1 and seen == [1]


def test_a_bad_request_is_raised_not_retried(tc):
    with pytest.raises(tailcast.InvalidStreamName):
        list(tc.follow("no spaces allowed"))
    with pytest.raises(ValueError):
        tc.follow("py:x", after=-1)


def test_the_retry_trap(tc, server, stream):
    """The server's first SSE block is `retry:` with no data. It must neither be taken for an
    event nor make the client start over from `now` (missing a stop sent meanwhile)."""
    with httpx.stream("GET", f"{server.url}/v1/streams/{stream}/sse", timeout=10) as r:
        first = next(r.iter_raw())
    assert first.startswith(b"retry: 200\n\n"), first
    p = SSEParser()
    assert p.feed(first.decode()) == [] and p.retry == 200

    # A stop sent right as the agent starts watching (before any other event) reaches it.
    watch = tc.watch_stop(stream)
    tc.stop(stream, "now")
    assert watch.wait(20), watch.error
    assert watch.reason == "now" and watch.event.seq == 1
    watch.close()
    # And the follow honoured the server's retry: hint.
    f = tc.follow(stream)
    assert next(f).type == "control.stop"
    assert f.state.retry_ms == 200
    f.close()


def test_stop_reaches_a_blocking_agent(tc, stream):
    called = []
    produced = []
    with tc.watch_stop(stream, callback=lambda ev: called.append(ev.data)) as watch:
        done = threading.Event()

        def agent():
            with tc.writer(stream) as w:
                i = 0
                while not watch.stopped:
                    w.write("token", {"i": i})
                    produced.append(i)
                    i += 1
                    if i % 50 == 0:
                        w.flush()
            done.set()

        t = threading.Thread(target=agent)
        t.start()
        wait_for(lambda: len(produced) > 100, 20, "the agent to produce")
        tc.stop(stream, {"by": "user"})
        assert done.wait(20), "the agent did not stop"
        t.join()
    assert called == [{"reason": {"by": "user"}}]


def test_stop_cancels_an_asyncio_agent(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as tc:
            progress = asyncio.Event()

            async def agent():
                async with tc.writer(stream) as w:
                    i = 0
                    while True:
                        w.write("token", {"i": i})
                        i += 1
                        if i == 20:
                            progress.set()
                        await asyncio.sleep(0.001)

            task = asyncio.create_task(agent())
            heard = []
            async with tc.watch_stop(stream, cancel=task, callback=heard.append) as watch:
                await asyncio.wait_for(progress.wait(), 20)
                await tc.stop(stream, "enough")
                ev = await asyncio.wait_for(watch.wait(), 20)
                assert ev is not None and watch.stopped and watch.reason == "enough"
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert heard == [ev]

    asyncio.run(main())


def test_closing_a_watch_ends_its_thread_and_connection(tc, server, stream):
    def sse_connections():
        return httpx.get(f"{server.url}/v1/stats", timeout=5).json()["connections"]["sse"]

    before = sse_connections()
    watch = tc.watch_stop(stream)
    wait_for(lambda: sse_connections() == before + 1, 20, "the watch to connect")
    watch.close()
    watch._thread.join(5)
    assert not watch._thread.is_alive() and not watch.stopped
    wait_for(lambda: sse_connections() == before, 20, "the watch's connection to close")


def test_compacted_follow_gives_whole_messages_then_the_live_tail(tc, stream):
    tc.append(stream, "msg", {"role": "assistant", "text": ""}, key="answer")
    words = [f" w{i}" for i in range(300)]
    tc.append_many(
        stream, [{"type": "msg", "key": "answer", "append": True, "data": {"text": w}} for w in words]
    )
    tc.append(stream, "progress", {"pct": 50})
    got = []
    f = tc.follow(stream, compact=True)

    def consume():
        for ev in f:
            got.append(ev)

    t = threading.Thread(target=consume)
    t.start()
    wait_for(lambda: len(got) >= 2)
    # Live appends come one by one and extend the message held.
    tc.append(stream, "msg", {"text": "!"}, key="answer", append=True)
    tc.close(stream)
    t.join(30)
    assert not t.is_alive()
    assert [(e.seq, e.folded, e.append) for e in got] == [
        (301, 301, False),
        (302, None, False),
        (303, None, True),
        (304, None, False),
    ]
    folded, full = tailcast.Messages(), tailcast.Messages()
    for ev in got:
        folded.apply(ev)
    for ev in tc.read(stream):
        full.apply(ev)
    assert folded.list == full.list
    assert folded.list[0].data == {"role": "assistant", "text": "".join(words) + "!"}
    # Resuming from a folded event's seq is exact; a compacted read pages the same way.
    assert [e.seq for e in tc.follow(stream, after=301, compact=True)] == [302, 303, 304]
    assert [(e.seq, e.folded) for e in tc.read(stream, compact=True, page_size=2)] == [
        (301, 301),
        (302, None),
        (303, None),
        (304, None),
    ]


def test_async_compacted_follow(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as c:
            await c.append(stream, "msg", "Hel", key="k")
            await c.append(stream, "msg", "lo", key="k", append=True)
            await c.close(stream)
            return [(e.seq, e.data, e.folded) async for e in c.follow(stream, compact=True)]

    got = asyncio.run(main())
    assert got[0] == (2, "Hello", 2)
    assert got[1][0] == 3
