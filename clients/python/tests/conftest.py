"""Live tailcast servers for the client's tests: the debug binary of this checkout, on a
scratch PostgreSQL database and on a scratch SQLite file (every `tc`-using test runs on both).

Set by clients/python/run-tests: TAILCAST_BIN (the binary), TAILCAST_PG_URL (a PostgreSQL
server's admin database; scratch databases are created next to it and dropped at the end).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import httpx
import pytest

BIN = os.environ.get("TAILCAST_BIN", "")
PG_URL = os.environ.get("TAILCAST_PG_URL", "")
RUN_ID = f"{int(time.time())}_{os.getpid()}"
# Flags every test server gets: quick SSE reconnects, expiry sweeps and retention passes.
FAST = [
    "--sse-retry-ms", "200",
    "--input-sweep-ms", "100",
    "--retention-interval-ms", "200",
    "--shutdown-timeout-s", "2",
]


def wait_for(cond: Callable[[], object], timeout: float = 20.0, what: str = "condition"):
    """Polls `cond` until it returns something truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One tailcast process; `kill9()` and `start()` again keep its port and database."""

    def __init__(self, database_url: str, logdir: Path, extra: Optional[List[str]] = None):
        self.database_url = database_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = list(extra or [])
        self.log_path = logdir / f"tailcast-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Server":
        if not BIN:
            raise RuntimeError("TAILCAST_BIN is not set: run these tests through clients/python/run-tests")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [BIN, "--listen", f"127.0.0.1:{self.port}", "--database-url", self.database_url, *FAST, *self.extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        log.close()

        def ready():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"tailcast exited: {self.log_tail()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, "tailcast to be ready")
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a Prometheus counter over the series matching `labels`."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total


class Stores:
    """Makes scratch databases of each kind and removes them at the end."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tailcast-py-"))
        self.pg_dbs: List[str] = []
        self.n = 0

    def url(self, backend: str) -> str:
        self.n += 1
        if backend == "sqlite":
            return f"sqlite://{self.dir}/db{self.n}.db"
        if not PG_URL:
            raise RuntimeError("TAILCAST_PG_URL is not set: run these tests through clients/python/run-tests")
        name = f"tailcast_py_{RUN_ID}_{self.n}"
        self.pg_dbs.append(name)
        return PG_URL.rsplit("/", 1)[0] + "/" + name  # tailcast creates it

    def cleanup(self) -> None:
        for name in self.pg_dbs:
            subprocess.run(
                ["psql", PG_URL, "-qc", f'drop database if exists "{name}" with (force)'],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stores() -> Iterator[Stores]:
    s = Stores()
    yield s
    s.cleanup()


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def server(backend: str, stores: Stores) -> Iterator[Server]:
    """A server shared by a backend's tests (each test uses its own streams)."""
    srv = Server(stores.url(backend), stores.dir).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(backend: str, stores: Stores) -> Iterator[Callable[..., Server]]:
    """Private servers for tests that kill or reconfigure them."""
    made: List[Server] = []

    def make(*extra: str) -> Server:
        srv = Server(stores.url(backend), stores.dir, list(extra)).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()


@pytest.fixture
def stream() -> str:
    return f"py:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def tc(server: Server):
    import tailcast

    with tailcast.Tailcast(server.url) as client:
        yield client

