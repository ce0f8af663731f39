"""ask / answer / expire, blocking and asyncio: the person's side answers what it sees on
the stream (`input.requested`), as a UI would."""

from __future__ import annotations

import asyncio
import threading

import pytest

import tailcast
from tailcast import AsyncTailcast

SCHEMA = {"type": "object", "required": ["approve"], "properties": {"approve": {"type": "boolean"}}}


def answer_when_asked(tc, stream, data, outcomes):
    """Follows the stream like a UI: answers the first input request with `data` (and once
    more, to see the first answer win)."""
    for ev in tc.follow(stream, types=["input.requested"]):
        rid = ev.data["request_id"]
        assert ev.data["prompt"] == "Deploy?" and ev.data["schema"] == SCHEMA
        with pytest.raises(tailcast.InputInvalid) as e:
            tc.answer(stream, rid, {"approve": "yes"})
        outcomes.append(e.value.code)
        res = tc.answer(stream, rid, data)
        outcomes.append(res.seq)
        with pytest.raises(tailcast.InputAlreadyAnswered):
            tc.answer(stream, rid, data)
        outcomes.append("second refused")
        return


def test_ask_returns_the_answer(tc, stream):
    tc.append(stream, "token", {"text": "planning"})
    outcomes = []
    t = threading.Thread(target=answer_when_asked, args=(tc, stream, {"approve": True}, outcomes))
    t.start()
    got = tc.ask(stream, "Deploy?", schema=SCHEMA, timeout=30)
    t.join(20)
    assert got == {"approve": True}
    assert outcomes[0] == "input_invalid" and outcomes[2] == "second refused"
    types = [e.type for e in tc.read(stream)]
    assert types == ["token", "input.requested", "input.answered"]
    assert outcomes[1] == 3


def test_an_unanswered_ask_expires(tc, stream):
    with pytest.raises(tailcast.InputExpired):
        tc.ask(stream, "Anyone?", timeout=0.3)
    # The server records the expiry on the stream, exactly once.
    from conftest import wait_for

    wait_for(lambda: [e.type for e in tc.read(stream)] == ["input.requested", "input.expired"], 20, "input.expired")
    rid = next(iter(tc.read(stream))).data["request_id"]
    with pytest.raises(tailcast.InputExpired):
        tc.answer(stream, rid, {"late": True})


def test_input_errors(tc, stream):
    with pytest.raises(tailcast.InvalidSchema):
        tc.ask(stream, "Deploy?", schema={"type": 12})
    with pytest.raises(tailcast.InputNotFound):
        tc.answer(stream, "nope", {"x": 1})
    tc.close(stream)
    with pytest.raises(tailcast.StreamClosed):
        tc.ask(stream, "Too late?")


def test_async_ask_answer_and_expire(server, stream):
    async def main():
        async with AsyncTailcast(server.url) as tc:

            async def ui():
                async for ev in tc.follow(stream, types=["input.requested"]):
                    return await tc.answer(stream, ev.data["request_id"], {"approve": False})

            ui_task = asyncio.create_task(ui())
            got = await tc.ask(stream, "Deploy?", schema=SCHEMA, timeout=30)
            assert got == {"approve": False}
            assert (await ui_task).seq == 2
            with pytest.raises(tailcast.InputExpired):
                await tc.ask(stream, "Anyone?", timeout=0.2)
            with pytest.raises(tailcast.InvalidSchema):
                await tc.ask(stream, "Deploy?", schema=[1])
            stopped = await tc.stop(stream)
            assert stopped.seq >= 4

    asyncio.run(main())
