"""The interactive input-request flow with third-party Python clients (httpx, httpx-sse,
websockets) against a live tailcast (e2e/run starts it and sets TAILCAST_URL).

An agent streams tokens and asks a question; a person's client, following the stream, sees
the request and answers it over the WebSocket; the agent sees the answer on its own
subscription; the stream closes and the client's SSE response ends.
"""

import asyncio
import json
import os
import uuid

import httpx
import websockets
from httpx_sse import aconnect_sse

BASE = os.environ.get("TAILCAST_URL", "")
WS_URL = BASE.replace("http://", "ws://", 1) + "/v1/ws"
WAIT_S = 30  # every wait is bounded by this

if not BASE:
    raise RuntimeError("TAILCAST_URL is not set: run these tests through e2e/run")

APPROVAL_SCHEMA = {
    "type": "object",
    "required": ["approve"],
    "properties": {"approve": {"type": "boolean"}},
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Ws:
    """One WebSocket connection speaking the tailcast protocol."""

    def __init__(self, conn):
        self.conn = conn
        self.events: list[dict] = []  # every `event` op received, in order

    @classmethod
    async def connect(cls) -> "Ws":
        conn = await asyncio.wait_for(websockets.connect(WS_URL), WAIT_S)
        ws = cls(conn)
        welcome = await ws.recv()
        assert welcome["op"] == "welcome", welcome
        assert welcome["protocol"] == 1
        assert welcome["connection_id"]
        return ws

    async def send(self, **op) -> None:
        await self.conn.send(json.dumps(op))

    async def recv(self) -> dict:
        msg = json.loads(await asyncio.wait_for(self.conn.recv(), WAIT_S))
        if msg.get("op") == "event":
            self.events.append(msg)
        return msg

    async def reply(self, ref: str) -> dict:
        """The reply carrying `ref` (events that arrive meanwhile are kept in `events`)."""
        while True:
            msg = await self.recv()
            if msg.get("ref") == ref:
                return msg

    async def event_of_type(self, stream: str, ty: str) -> dict:
        for ev in self.events:
            if ev["stream"] == stream and ev["type"] == ty:
                return ev
        while True:
            msg = await self.recv()
            if msg.get("op") == "event" and msg["stream"] == stream and msg["type"] == ty:
                return msg

    async def close(self) -> None:
        await self.conn.close()


async def follow_sse(client: httpx.AsyncClient, stream: str, on_event) -> list[dict]:
    """Follows the stream over SSE from the beginning until the server ends the response."""
    got = []
    async with aconnect_sse(client, "GET", f"/v1/streams/{stream}/sse?after=0") as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        async for sse in source.aiter_sse():
            if not sse.data:
                continue  # a `retry:`-only block; httpx-sse yields it, browsers dispatch nothing
            assert sse.event == "message", f"unexpected frame {sse.event}: {sse.data}"
            env = json.loads(sse.data)
            assert sse.id == str(env["seq"])
            got.append(env)
            await on_event(env)
    return got


def test_agent_asks_person_answers_over_websocket():
    asyncio.run(asyncio.wait_for(agent_asks_person_answers(), 3 * WAIT_S))


async def agent_asks_person_answers():
    stream = unique("e2e-input")
    request_id = unique("approve")
    async with httpx.AsyncClient(base_url=BASE, timeout=WAIT_S) as agent_http, httpx.AsyncClient(
        base_url=BASE, timeout=httpx.Timeout(WAIT_S, read=None)
    ) as person_http:
        # The agent follows its own stream over the WebSocket to hear the answer.
        agent_ws = await Ws.connect()
        await agent_ws.send(op="subscribe", stream=stream, after=0, ref="sub")
        sub = await agent_ws.reply("sub")
        assert sub["op"] == "subscribed" and sub["stream"] == stream, sub

        person_ws = await Ws.connect()
        answered = asyncio.Event()
        # The person answers only after the agent has checked the open list below, which
        # must still show the request then.
        may_answer = asyncio.Event()
        replies: dict[str, dict] = {}

        async def person_sees(env):
            if env["type"] != "input.requested":
                return
            assert env["data"]["request_id"] == request_id
            assert env["data"]["prompt"] == "Deploy to production?"
            assert env["data"]["schema"] == APPROVAL_SCHEMA
            await asyncio.wait_for(may_answer.wait(), WAIT_S)
            # An answer that breaks the request's schema is refused; the connection stays.
            await person_ws.send(
                op="input", stream=stream, request_id=request_id,
                data={"approve": "yes"}, ref="bad",
            )
            replies["bad"] = await person_ws.reply("bad")
            await person_ws.send(
                op="input", stream=stream, request_id=request_id,
                data={"approve": True}, ref="good",
            )
            replies["good"] = await person_ws.reply("good")
            await person_ws.send(
                op="input", stream=stream, request_id=request_id,
                data={"approve": False}, ref="late",
            )
            replies["late"] = await person_ws.reply("late")
            answered.set()

        person = asyncio.create_task(follow_sse(person_http, stream, person_sees))

        # The agent streams tokens, then asks.
        res = await agent_http.post(
            f"/v1/streams/{stream}/events",
            json=[{"type": "token", "data": {"text": t}} for t in ["Ready ", "to ", "deploy."]],
        )
        assert res.status_code == 201, res.text
        res = await agent_http.post(
            f"/v1/streams/{stream}/inputs",
            json={
                "request_id": request_id,
                "prompt": "Deploy to production?",
                "schema": APPROVAL_SCHEMA,
                "timeout_ms": 120_000,
            },
        )
        assert res.status_code == 201, res.text
        asked = res.json()
        assert asked["request_id"] == request_id and asked["seq"] == 4

        # A client that joins late learns what is still open.
        res = await agent_http.get(f"/v1/streams/{stream}/inputs", params={"status": "open"})
        assert res.status_code == 200, res.text
        assert [i["request_id"] for i in res.json()["inputs"]] == [request_id]
        may_answer.set()

        await asyncio.wait_for(answered.wait(), WAIT_S)
        assert replies["bad"]["op"] == "error" and replies["bad"]["code"] == "input_invalid", replies
        assert replies["good"]["op"] == "ack", replies
        assert replies["late"]["op"] == "error", replies
        assert replies["late"]["code"] == "input_already_answered", replies

        # The agent hears the answer on its subscription.
        ev = await agent_ws.event_of_type(stream, "input.answered")
        assert ev["data"] == {"request_id": request_id, "data": {"approve": True}}
        assert ev["seq"] == 5

        res = await agent_http.get(f"/v1/streams/{stream}/inputs/{request_id}")
        assert res.status_code == 200, res.text
        assert res.json()["status"] == "answered"
        assert res.json()["data"] == {"approve": True}
        # The REST answer path agrees: first answer won.
        res = await agent_http.post(
            f"/v1/streams/{stream}/inputs/{request_id}", json={"data": {"approve": False}}
        )
        assert res.status_code == 409 and res.json()["code"] == "input_already_answered", res.text
        res = await agent_http.get(f"/v1/streams/{stream}/inputs", params={"status": "open"})
        assert res.json()["inputs"] == []

        # The agent finishes; the person's SSE response ends after stream.closed.
        res = await agent_http.post(f"/v1/streams/{stream}/close", json={"reason": "deployed"})
        assert res.status_code == 201, res.text
        seen = await asyncio.wait_for(person, WAIT_S)
        assert [e["seq"] for e in seen] == [1, 2, 3, 4, 5, 6]
        assert [e["type"] for e in seen] == [
            "token", "token", "token", "input.requested", "input.answered", "stream.closed",
        ]
        closed = await agent_ws.event_of_type(stream, "stream.closed")
        assert closed["seq"] == 6
        assert [e["seq"] for e in agent_ws.events if e["stream"] == stream] == [1, 2, 3, 4, 5, 6]
        await agent_ws.close()
        await person_ws.close()


def test_unanswered_request_expires_once_and_refuses_late_answers():
    asyncio.run(asyncio.wait_for(unanswered_request_expires(), 3 * WAIT_S))


async def unanswered_request_expires():
    stream = unique("e2e-expiry")
    async with httpx.AsyncClient(base_url=BASE, timeout=WAIT_S) as http:
        ws = await Ws.connect()
        # `from` is a Python keyword, hence the dict.
        await ws.send(**{"op": "subscribe", "stream": stream, "from": "now", "ref": "s"})
        sub = await ws.reply("s")
        assert sub["op"] == "subscribed" and sub["head"] == 0, sub
        await ws.send(op="subscribe", stream=stream, after=0, ref="again")
        again = await ws.reply("again")
        assert again["op"] == "error" and again["code"] == "already_subscribed", again

        res = await http.post(
            f"/v1/streams/{stream}/inputs",
            json={"request_id": "q1", "prompt": "Still there?", "timeout_ms": 300},
        )
        assert res.status_code == 201, res.text
        expired = await ws.event_of_type(stream, "input.expired")
        assert expired["data"]["request_id"] == "q1"

        res = await http.post(f"/v1/streams/{stream}/inputs/q1", json={"data": "yes"})
        assert res.status_code == 410 and res.json()["code"] == "input_expired", res.text
        await ws.send(op="input", stream=stream, request_id="q1", data="yes", ref="late")
        late = await ws.reply("late")
        assert late["op"] == "error" and late["code"] == "input_expired", late
        res = await http.get(f"/v1/streams/{stream}/inputs/q1", params={"wait": 1})
        assert res.json()["status"] == "expired"

        # Exactly once: the log holds one input.expired for q1.
        res = await http.get(f"/v1/streams/{stream}/events", params={"after": 0})
        types = [e["type"] for e in res.json()["events"]]
        assert types == ["input.requested", "input.expired"], types
        await ws.close()
