"""A Python SSE client (httpx-sse) resumes a stream by Last-Event-ID: nothing missed or
repeated across a disconnect, and a closed stream answers the final reconnect with 204."""

import json
import os
import uuid

import httpx
from httpx_sse import connect_sse

BASE = os.environ.get("TAILCAST_URL", "")
if not BASE:
    raise RuntimeError("TAILCAST_URL is not set: run these tests through e2e/run")
WAIT_S = 30


def read_events(client, stream, count, last_event_id=None):
    """Reads `count` events from the SSE endpoint, then disconnects."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    got = []
    with connect_sse(client, "GET", f"/v1/streams/{stream}/sse", headers=headers) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if not sse.data:
                continue  # a `retry:`-only block; httpx-sse yields it, browsers dispatch nothing
            assert sse.event == "message", sse
            got.append((sse.id, json.loads(sse.data)))
            if len(got) == count:
                break
    return got


def test_resume_by_last_event_id_misses_and_repeats_nothing():
    stream = f"e2e-py-sse-{uuid.uuid4().hex[:12]}"
    with httpx.Client(base_url=BASE, timeout=WAIT_S) as client:
        res = client.post(
            f"/v1/streams/{stream}/events",
            json=[{"type": "token", "data": {"i": i}} for i in range(1, 11)],
        )
        assert res.status_code == 201, res.text

        first = read_events(client, stream, 4)
        assert [int(i) for i, _ in first] == [1, 2, 3, 4]

        # More events while disconnected, then resume from the last id seen.
        res = client.post(
            f"/v1/streams/{stream}/events",
            json=[{"type": "token", "data": {"i": i}} for i in range(11, 16)],
        )
        assert res.status_code == 201, res.text
        res = client.post(f"/v1/streams/{stream}/close", json={"reason": "done"})
        assert res.status_code == 201, res.text

        rest = read_events(client, stream, 12, last_event_id=first[-1][0])
        seqs = [env["seq"] for _, env in first + rest]
        assert seqs == list(range(1, 17))
        assert [env["data"]["i"] for _, env in first + rest[:-1]] == list(range(1, 16))
        assert rest[-1][1]["type"] == "stream.closed"

        # The cursor is at the closed stream's head: 204, EventSource-style clients stop.
        res = client.get(
            f"/v1/streams/{stream}/sse", headers={"Last-Event-ID": rest[-1][0]}
        )
        assert res.status_code == 204
