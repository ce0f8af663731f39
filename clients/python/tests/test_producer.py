"""append, append_many, writer, close, read, info: blocking and asyncio, on both stores."""

from __future__ import annotations

import asyncio

import pytest

import tailcast
from tailcast import AsyncTailcast, Tailcast


def seqs_and_data(tc, stream):
    return [(e.seq, e.type, e.data) for e in tc.read(stream)]


def test_append_returns_the_seq_and_a_resent_id_is_not_doubled(tc, stream):
    first = tc.append(stream, "token", {"text": "Hel"})
    assert (first.seq, first.stream, first.duplicate) == (1, stream, False)
    assert first.events[0].id  # an idempotency id was made up for it
    again = tc.append(stream, "token", {"text": "Hel"}, id=first.events[0].id)
    assert (again.seq, again.duplicate) == (1, True)
    keyed = tc.append(stream, "progress", {"pct": 50}, id="p-1", key="progress")
    assert keyed.seq == 2 and keyed.events[0].id == "p-1"
    events = list(tc.read(stream))
    assert [(e.seq, e.type, e.data, e.key) for e in events] == [
        (1, "token", {"text": "Hel"}, None),
        (2, "progress", {"pct": 50}, "progress"),
    ]
    assert events[1].id == "p-1" and events[0].time.tzinfo is not None


def test_expected_seq_conflict_carries_the_head(tc, stream):
    tc.append(stream, "a", 1)
    assert tc.append(stream, "b", 2, expected_seq=1).seq == 2
    with pytest.raises(tailcast.SeqConflict) as e:
        tc.append(stream, "c", 3, expected_seq=1)
    assert e.value.head == 2 and e.value.status == 409 and e.value.code == "seq_conflict"


def test_append_many_is_one_batch_in_order(tc, stream):
    res = tc.append_many(
        stream,
        [("token", {"text": "a"}), {"type": "token", "data": {"text": "b"}, "id": "b1"},
         {"type": "progress", "data": 1, "key": "p"}],
    )
    assert (res.first_seq, res.last_seq) == (1, 3)
    assert [a.seq for a in res.events] == [1, 2, 3] and res.events[1].id == "b1"
    # The same batch again (same ids): nothing new.
    again = tc.append_many(stream, [{"type": "token", "data": {"text": "b"}, "id": "b1"}])
    assert again.duplicate and again.seq == 2
    assert [d for _, _, d in seqs_and_data(tc, stream)] == [{"text": "a"}, {"text": "b"}, 1]


def test_bad_input_raises_the_class_of_its_code(tc, stream):
    with pytest.raises(tailcast.InvalidStreamName):
        tc.append("not a valid name!", "token", 1)
    with pytest.raises(tailcast.ReservedType):
        tc.append(stream, "stream.closed", {})
    with pytest.raises(tailcast.BatchTooLarge) as e:
        tc.append_many(stream, [("t", i) for i in range(1001)])
    assert e.value.limit == 1000
    with pytest.raises(tailcast.EmptyBatch):
        tc.append_many(stream, [])
    with pytest.raises(tailcast.InvalidEvent):
        tc.append(stream, "token", 1, id="x" * 300)
    with pytest.raises(tailcast.StreamNotFound):
        list(tc.read(stream))
    with pytest.raises(tailcast.StreamNotFound):
        tc.info(stream)
    with pytest.raises(TypeError):
        tc.append_many(stream, [{"type": "t", "dta": 1}])
    assert isinstance(tailcast.StreamNotFound("x", "y", "z", {}), tailcast.NotFound)


def test_close_is_idempotent_and_ends_the_stream(tc, stream):
    tc.append(stream, "token", 1)
    closed = tc.close(stream, reason="done")
    assert closed.seq == 2
    assert tc.close(stream, reason="done").seq == 2  # again: the same event
    with pytest.raises(tailcast.StreamClosed) as e:
        tc.append(stream, "token", 2)
    assert e.value.head == 2
    assert seqs_and_data(tc, stream)[-1] == (2, "stream.closed", {"reason": "done"})
    info = tc.info(stream)
    assert info["closed"] is True and info["head"] == 2


def test_read_pages_through_everything_and_stops_at_limit(tc, stream):
    tc.append_many(stream, [("n", i) for i in range(250)])
    assert [e.data for e in tc.read(stream, page_size=100)] == list(range(250))
    assert [e.seq for e in tc.read(stream, after=240, page_size=3)] == list(range(241, 251))
    assert [e.seq for e in tc.read(stream, after=10, limit=25, page_size=10)] == list(range(11, 36))


def test_the_writer_turns_1000_tokens_into_a_few_requests_in_order(tc, server, stream):
    route = "/v1/streams/{stream}/events"
    before = server.metric("tailcast_http_requests_total", route=route, method="POST")
    with tc.writer(stream) as w:
        for i in range(1000):
            w.write("token", {"i": i})
    after = server.metric("tailcast_http_requests_total", route=route, method="POST")
    assert w.events == 1000 and w.last_seq == 1000
    # Measured on the server: one POST per batch, not per token.
    assert after - before == w.requests
    assert w.requests <= 20, w.requests
    assert [(e.seq, e.data["i"]) for e in tc.read(stream)] == [(i + 1, i) for i in range(1000)]


def test_the_writer_flushes_after_linger_and_raises_a_failure(tc, stream):
    w = tc.writer(stream, linger=0.05)
    w.write("token", {"i": 0})
    w.write("token", {"i": 1}, key="k")
    w.flush()
    assert w.requests == 1 and w.last_seq == 2
    tc.close(stream)
    w.write("token", {"i": 2})  # queued; the send fails: the stream is closed
    with pytest.raises(tailcast.StreamClosed):
        w.flush()
    with pytest.raises(tailcast.StreamClosed):
        w.write("token", {"i": 3})
    with pytest.raises(ValueError):
        tc.writer(stream, max_events=5000)


def test_async_producer_and_reader(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as tc:
            one = await tc.append(stream, "token", {"text": "a"}, id="a1")
            assert one.seq == 1
            assert (await tc.append(stream, "token", {"text": "a"}, id="a1")).duplicate
            many = await tc.append_many(stream, [("token", {"text": "b"}), ("token", {"text": "c"})])
            assert (many.first_seq, many.last_seq) == (2, 3)
            with pytest.raises(tailcast.SeqConflict):
                await tc.append(stream, "x", 1, expected_seq=1)
            async with tc.writer(stream, max_events=100) as w:
                for i in range(1000):
                    w.write("token", {"i": i})
                    if i % 100 == 0:
                        await asyncio.sleep(0)  # a producer that yields now and then
            assert w.events == 1000 and w.requests <= 30 and w.last_seq == 1003
            assert (await tc.close(stream, "done")).seq == 1004
            got = [e async for e in tc.read(stream, page_size=300)]
            assert [e.seq for e in got] == list(range(1, 1005))
            assert [e.data["i"] for e in got[3:-1]] == list(range(1000))
            assert [e.seq async for e in tc.read(stream, after=1000, limit=2)] == [1001, 1002]
            assert (await tc.info(stream))["closed"] is True
            with pytest.raises(tailcast.StreamClosed):
                await tc.append(stream, "x", 1)

    asyncio.run(main())


def test_a_token_is_sent_on_every_request_and_a_missing_one_is_unauthorized(make_server, stream):
    srv = make_server("--admin-token", "s3cret-token")
    with Tailcast(srv.url, token="s3cret-token") as tc:
        assert tc.append(stream, "token", 1).seq == 1
        tc.close(stream)
        assert [e.seq for e in tc.follow(stream)] == [1, 2]  # SSE with the bearer header
        assert [e.seq for e in tc.read(stream)] == [1, 2]
    with Tailcast(srv.url) as anon:
        with pytest.raises(tailcast.Unauthorized):
            anon.append(stream, "token", 2)
        with pytest.raises(tailcast.Unauthorized):
            list(anon.follow(stream))
    with Tailcast(srv.url, token="wrong") as bad:
        with pytest.raises(tailcast.Unauthorized):
            bad.info(stream)


def test_async_writer_drain_bounds_the_queue(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as tc:
            w = tc.writer(stream, max_events=50, max_pending=100)
            for i in range(500):
                w.write("token", {"i": i})
                await w.drain()  # waits while 100 are queued
                assert len(w._queue) <= 100
            await w.aclose()
            assert w.events == 500 and w.last_seq == 500
            assert [e.data["i"] async for e in tc.read(stream)] == list(range(500))

    asyncio.run(main())
