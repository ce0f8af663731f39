"""The package as installed from the wheel: where it comes from, its types, its error codes,
and the SSE parser on its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tailcast
from tailcast import SSEParser
from tailcast.errors import ERROR_CODES, ApiError, error_from_response

ROOT = Path(__file__).resolve().parents[3]


def test_imported_from_the_installed_wheel_not_the_source_tree():
    where = Path(tailcast.__file__).resolve()
    assert "site-packages" in where.parts, where
    assert str(where).startswith(str(Path(sys.prefix).resolve())), (where, sys.prefix)
    assert not str(where).startswith(str(ROOT / "clients" / "python" / "src"))
    assert (where.parent / "py.typed").is_file(), "the wheel must ship py.typed"


def test_every_openapi_error_code_has_its_own_class():
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    codes = set(spec["components"]["schemas"]["ErrorCode"]["enum"])
    assert codes == set(ERROR_CODES), (codes ^ set(ERROR_CODES))
    for code, cls in ERROR_CODES.items():
        assert issubclass(cls, ApiError)
        err = error_from_response(400, f'{{"code":"{code}","detail":"d"}}'.encode())
        assert type(err) is cls and err.code == code and err.detail == "d"
    # Distinct codes, distinct classes: catching one never catches another by accident.
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)


def test_an_error_without_problem_json_falls_back_to_its_status():
    err = error_from_response(409, b"<html>proxy says no</html>")
    assert isinstance(err, tailcast.Conflict) and err.code is None
    assert isinstance(error_from_response(502, b""), tailcast.ServerError)


def feed_all(parser: SSEParser, text: str, step: int):
    out = []
    for i in range(0, len(text), step):
        out += parser.feed(text[i : i + step])
    return out


RAW = (
    "\ufeffretry: 2000\r\n\r\n"
    ": keep-alive\n\n"
    "id: 7\ndata: {\"a\":\ndata: 1}\n\n"
    "event: notice\rdata: {\"notice\":\"gap\"}\r\r"
    "id: 9\n\n"
    "data:no-space\n\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, len(RAW)])
def test_sse_parser_any_chunking_and_the_retry_block_is_not_an_event(step):
    p = SSEParser()
    msgs = feed_all(p, RAW, step)
    assert [(m.event, m.data, m.id) for m in msgs] == [
        ("message", '{"a":\n1}', "7"),
        ("notice", '{"notice":"gap"}', "7"),
        ("message", "no-space", "9"),
    ]
    assert p.retry == 2000
    assert p.last_event_id == "9" and p.dispatched_id == "9"


def test_sse_parser_ids_are_not_dispatched_before_their_block_ends():
    p = SSEParser()
    assert p.feed("id: 5\ndata: x\n") == []
    assert p.last_event_id == "5" and p.dispatched_id == ""
    assert [m.id for m in p.feed("\n")] == ["5"]


def test_runner_sets_the_environment():
    assert os.environ.get("TAILCAST_BIN"), "run through clients/python/run-tests"


TYPED_USER = '''
import asyncio
from typing import List
from tailcast import AsyncTailcast, AppendResult, Event, StreamGap, Tailcast

def produce(tc: Tailcast) -> int:
    res: AppendResult = tc.append("s", "token", {"text": "hi"})
    with tc.writer("s") as w:
        w.write("token", {"text": "!"})
    return res.seq

def consume(tc: Tailcast) -> List[int]:
    try:
        return [e.seq for e in tc.follow("s", after=0)]
    except StreamGap as gap:
        return [gap.oldest or 0]

async def agent(tc: AsyncTailcast) -> None:
    task = asyncio.current_task()
    assert task is not None
    async with tc.watch_stop("s", cancel=task) as watch:
        ev: Event | None = await watch.wait()
        print(ev, await tc.ask("s", "ok?", timeout=1.5))
'''


def test_the_installed_package_type_checks_under_mypy_strict(tmp_path):
    """py.typed ships, and the package and a typed user of it pass `mypy --strict`."""
    (tmp_path / "user.py").write_text(TYPED_USER)
    mypy = [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.10", "--cache-dir", str(tmp_path / "cache")]
    # The package itself, then a user of it (which fails without py.typed: "missing library
    # stubs or py.typed marker").
    for target in (["-p", "tailcast"], [str(tmp_path / "user.py")]):
        r = subprocess.run(mypy + target, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
