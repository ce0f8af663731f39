"""examples/fastapi_agent.py, run for real: uvicorn on a free port, against a live tailcast."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import free_port, wait_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def agent_app(server, tmp_path_factory):
    """One app per store for this module's tests (starting uvicorn is the slow part)."""
    tmp_path = tmp_path_factory.mktemp("uvicorn")
    port = free_port()
    log = open(tmp_path / "uvicorn.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "fastapi_agent:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=EXAMPLES,
        env={**os.environ, "TAILCAST_URL": server.url, "AGENT_TOKEN_DELAY": "0.002"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 30, "uvicorn")
    yield url
    proc.terminate()
    proc.wait(10)
    log.close()


def test_a_run_streams_tokens_asks_and_finishes_when_approved(agent_app, tc):
    page = httpx.get(agent_app + "/", timeout=10)
    assert "EventSource" in page.text and tc.base_url in page.text
    stream = httpx.post(agent_app + "/runs", json={"prompt": "ship it"}, timeout=10).json()["stream"]
    text, types = "", []
    for ev in tc.follow(stream):
        types.append(ev.type)
        if ev.type == "token":
            text += ev.data["text"]
        if ev.type == "input.requested":
            assert ev.data["prompt"] == "Deploy now?"
            assert "Step three, deploy." in text  # the plan came before the question
            tc.answer(stream, ev.data["request_id"], {"approve": True})
    assert types[0] == "run.started" and types[-1] == "stream.closed"
    assert "input.answered" in types and "All services are healthy." in text
    assert ev.data == {"reason": "deployed"}


def test_a_stop_while_it_waits_for_approval_ends_the_run(agent_app, tc):
    stream = httpx.post(agent_app + "/runs", json={}, timeout=10).json()["stream"]
    last = None
    for ev in tc.follow(stream):
        if ev.type == "input.requested":
            tc.stop(stream, "user pressed stop")
        last = ev
    assert last.type == "stream.closed" and last.data == {"reason": "stopped"}
    wait_for(lambda: httpx.get(agent_app + "/healthz", timeout=5).json()["runs"] == 0, 20, "the run to end")
