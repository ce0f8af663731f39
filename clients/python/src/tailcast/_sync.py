"""The blocking client: :class:`Tailcast`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, List, Optional, Sequence

import httpx

from . import _core as core
from .errors import InputExists, TransportError
from .models import AppendResult, Event, StopOutcome

__all__ = ["Tailcast", "Writer", "Follow", "StopWatch"]


class Tailcast:
    """A blocking tailcast client.

    ``Tailcast("http://127.0.0.1:8080", token=None)``; use it as a context manager or call
    :meth:`shutdown` to release its connections. Safe to share between threads.
    """

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        *,
        timeout: float = 30.0,
        retry: core.RetryPolicy = core.RetryPolicy(),
        idle_timeout: float = 60.0,
        http: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        #: A follow's connection is dropped and resumed after this long without a byte
        #: (the server sends a keep-alive every 15 s by default).
        self.idle_timeout = idle_timeout
        self._timeout = timeout
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout)
        self._headers = core.auth_headers(token)
        #: Requests sent again so far (after a transport error, 429 or 503): for monitoring.
        self.retries = 0

    def __enter__(self) -> "Tailcast":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Releases the client's connections (does not touch any stream)."""
        if self._own_http:
            self._http.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        params: Optional[Dict[str, Any]] = None,
        idempotent: bool,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        """One request with the retry rules: transport errors (only if ``idempotent``, unless
        the request surely never left), 429 and 503 (after ``Retry-After``)."""
        content = core.dumps(body) if body is not None else None
        headers = dict(self._headers)
        if content is not None:
            headers["content-type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            response: Optional[httpx.Response] = None
            try:
                response = self._http.request(
                    method,
                    self.base_url + url,
                    content=content,
                    params=params,
                    headers=headers,
                    timeout=timeout if timeout is not None else self._timeout,
                )
            except httpx.TransportError as e:
                if attempt >= self.retry.attempts or not (idempotent or core.safe_to_resend(e)):
                    raise TransportError(f"{method} {url}: {e!r}") from e
            else:
                if attempt >= self.retry.attempts or not core.should_retry(response, idempotent):
                    core.raise_for(response)
                    return response
            self.retries += 1
            time.sleep(self.retry.delay(attempt, response))

    # -- producer ---------------------------------------------------------------------------

    def append(
        self,
        stream: str,
        type: str,
        data: Any = None,
        *,
        id: Optional[str] = None,
        key: Optional[str] = None,
        expected_seq: Optional[int] = None,
        append: bool = False,
    ) -> AppendResult:
        """Appends one event. It gets an idempotency id (``id``, or a new one), so retries
        after a lost answer never append it twice."""
        return self._append(stream, [core.event_body(type, data, id, key, append)], expected_seq)

    def append_many(
        self,
        stream: str,
        events: Iterable[core.EventLike],
        *,
        expected_seq: Optional[int] = None,
    ) -> AppendResult:
        """Appends a batch in one request (all or nothing). Each event is a mapping with
        ``type``, ``data`` and optionally ``id``/``key``, or a ``(type, data)`` tuple."""
        return self._append(stream, core.normalise_events(events), expected_seq)

    def _append(
        self, stream: str, events: List[Dict[str, Any]], expected_seq: Optional[int]
    ) -> AppendResult:
        params = {"expected_seq": expected_seq} if expected_seq is not None else None
        r = self._request(
            "POST", core.path(stream, "events"), body=events, params=params, idempotent=True
        )
        return AppendResult.from_json(r.json())

    def writer(
        self,
        stream: str,
        *,
        max_events: int = 500,
        max_bytes: int = 1 << 20,
        linger: float = 0.005,
        max_pending: int = 10_000,
    ) -> "Writer":
        """A writer that coalesces appends into batches: see :class:`Writer`."""
        return Writer(self, stream, max_events, max_bytes, linger, max_pending)

    def close(self, stream: str, reason: Any = None) -> AppendResult:
        """Closes a stream (appends ``stream.closed``); idempotent."""
        body = {"reason": reason} if reason is not None else {}
        r = self._request("POST", core.path(stream, "close"), body=body, idempotent=True)
        return AppendResult.from_json(r.json())

    # -- consumer ---------------------------------------------------------------------------

    def follow(
        self,
        stream: str,
        after: int = 0,
        types: Optional[Sequence[str]] = None,
        *,
        compact: bool = False,
    ) -> "Follow":
        """Every event after ``after``, live, exactly once and in order, across disconnects
        and server restarts; ends after ``stream.closed``. See :class:`Follow`.

        ``compact=True``: each (re)connection's catch-up comes with every run of appends to a
        message folded into one event (``Event.folded``), then the live tail event by event;
        each seq stays an exact cursor. Feed the events to :class:`Messages` to hold whole
        messages either way."""
        return Follow(self, stream, after, types, compact)

    def read(
        self,
        stream: str,
        after: int = 0,
        limit: Optional[int] = None,
        *,
        page_size: int = 1000,
        compact: bool = False,
    ) -> Iterator[Event]:
        """Replays the stream from ``after``, page by page, until a page comes back empty
        (at most ``limit`` events if given; ``compact``: runs of appends folded)."""
        left = limit
        while left is None or left > 0:
            n = page_size if left is None else min(page_size, left)
            r = self._request(
                "GET",
                core.path(stream, "events"),
                params={"after": after, "limit": n, **({"compact": 1} if compact else {})},
                idempotent=True,
            )
            page = r.json()
            events = page["events"]
            if not events:
                return
            for env in events:
                yield Event.from_envelope(env)
            if left is not None:
                left -= len(events)
            after = int(page["next_after"])

    def info(self, stream: str) -> Dict[str, Any]:
        """The stream's metadata: ``head``, ``oldest_seq``, ``closed``, times."""
        return dict(self._request("GET", core.path(stream), idempotent=True).json())

    # -- inputs and stop ----------------------------------------------------------------------

    def ask(
        self,
        stream: str,
        prompt: Any,
        *,
        schema: Any = None,
        timeout: Optional[float] = None,
        data: Any = None,
        request_id: Optional[str] = None,
    ) -> Any:
        """Asks a person (appends ``input.requested``) and waits for the answer; returns the
        answer's data. ``timeout`` (seconds) is the request's lifetime on the server (default:
        the server's). Raises :class:`InputExpired` if nobody answers in time,
        :class:`InvalidSchema` if ``schema`` is not a JSON Schema."""
        request_id = request_id or core.new_id()
        body = core.input_body(prompt, schema, timeout, data, request_id)
        try:
            self._request("POST", core.path(stream, "inputs"), body=body, idempotent=True)
        except InputExists:
            # Our own earlier attempt got through before its answer was lost: same id, ours.
            pass
        return self.wait_answer(stream, request_id)

    def wait_answer(self, stream: str, request_id: str) -> Any:
        """Waits for an existing input request's outcome (long polls)."""
        while True:
            r = self._request(
                "GET",
                core.path(stream, "inputs", request_id),
                params={"wait": core.MAX_WAIT_S},
                idempotent=True,
                timeout=core.MAX_WAIT_S + self._timeout,
            )
            status = r.json()
            if status["status"] == "answered":
                return status.get("data")
            if status["status"] == "expired":
                from .errors import InputExpired

                raise InputExpired(
                    410,
                    "input_expired",
                    f"input request {request_id!r} expired unanswered",
                    dict(status),
                )

    def answer(self, stream: str, request_id: str, data: Any) -> AppendResult:
        """Answers an input request (the first answer wins): 409 :class:`InputAlreadyAnswered`,
        410 :class:`InputExpired`, 422 :class:`InputInvalid` against the request's schema."""
        r = self._request(
            "POST",
            core.path(stream, "inputs", request_id),
            body={"data": data},
            idempotent=False,
        )
        return AppendResult.from_json(r.json())

    def stop(self, stream: str, reason: Any = None) -> AppendResult:
        """Appends ``control.stop``: the agent producing the stream winds down."""
        body = {"reason": reason} if reason is not None else {}
        r = self._request("POST", core.path(stream, "stop"), body=body, idempotent=False)
        return AppendResult.from_json(r.json())

    def watch_stop(
        self,
        stream: str,
        callback: Optional[Callable[[Event], Any]] = None,
        *,
        after: int = 0,
    ) -> "StopWatch":
        """Follows ``stream`` for ``control.stop`` in a background thread; see :class:`StopWatch`."""
        return StopWatch(self, stream, callback, after)

    def ack_stop(self, stream: str, stop_seq: int, data: Any = None) -> AppendResult:
        """The agent has stopped: appends ``control.stopped`` ``{"stop_seq": stop_seq}``."""
        ev = core.stop_answer_body(stop_seq, False, None, data)
        return self._append(stream, [core.event_body(ev["type"], ev["data"], None, None)], None)

    def refuse_stop(self, stream: str, stop_seq: int, reason: Any = None) -> AppendResult:
        """The agent will not stop: appends ``control.stop_refused`` with ``reason``."""
        ev = core.stop_answer_body(stop_seq, True, reason, None)
        return self._append(stream, [core.event_body(ev["type"], ev["data"], None, None)], None)

    def wait_stop_outcome(
        self, stream: str, stop_seq: int, timeout: float = 30.0, *, poll: float = 0.25
    ) -> StopOutcome:
        """Whether the stop at ``stop_seq`` (the seq :meth:`stop` returned) took effect: reads
        the stream after it until the agent answers, the stream closes, or ``timeout``
        seconds pass. See :class:`StopOutcome`."""
        deadline = time.monotonic() + timeout
        after = stop_seq
        while True:
            r = self._request(
                "GET",
                core.path(stream, "events"),
                params={"after": after, "limit": 1000},
                idempotent=True,
            )
            page = r.json()
            for env in page["events"]:
                outcome = core.stop_outcome_of(env, stop_seq)
                if outcome is not None:
                    return StopOutcome(outcome, Event.from_envelope(env))
            after = int(page["next_after"])
            if page["events"]:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return StopOutcome("timeout")
            time.sleep(min(poll, left))

    # -- leases -------------------------------------------------------------------------------

    def set_lease(self, stream: str, lease_s: Optional[int]) -> Dict[str, Any]:
        """Gives the stream a lease of ``lease_s`` seconds (None removes it): unless an append
        or :meth:`heartbeat` comes that often, the server closes it as ``abandoned``. Returns
        the stream's metadata (``lease_s``, ``last_activity_at``, ``lease_expires_at``)."""
        r = self._request("PATCH", core.path(stream), body={"lease_s": lease_s}, idempotent=True)
        return dict(r.json())

    def heartbeat(self, stream: str) -> Dict[str, Any]:
        """Renews the stream's lease without appending; 409 :class:`StreamClosed` once closed."""
        return dict(self._request("POST", core.path(stream, "heartbeat"), idempotent=True).json())


class Follow(Iterator[Event]):
    """An iterator of a stream's events over SSE.

    Resumes with ``Last-Event-ID`` (its :attr:`cursor`) after any disconnect or server
    restart, hands over each event exactly once in seq order, yields ``stream.closed`` last
    and then stops. A ``gap`` or ``reset`` notice raises :class:`StreamGap` /
    :class:`StreamReset`; a deleted stream raises :class:`StreamDeleted`; a 4xx answer raises
    its :class:`ApiError`. Close it (or use ``with``) to drop the connection early.
    """

    def __init__(
        self,
        client: Tailcast,
        stream: str,
        after: int,
        types: Optional[Sequence[str]],
        compact: bool = False,
    ) -> None:
        self._client = client
        self.state = core.FollowState(stream, after, types, compact)
        self._gen = self._run()
        self._response: Optional[httpx.Response] = None
        self._closed = False

    @property
    def cursor(self) -> int:
        """The seq of the last event handed over: resume from here."""
        return self.state.cursor

    def __iter__(self) -> "Follow":
        return self

    def __next__(self) -> Event:
        return next(self._gen)

    def __enter__(self) -> "Follow":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        r = self._response
        if r is not None:
            # Closing a socket does not wake a thread blocked reading it; shutting it down does.
            try:
                ns = r.extensions.get("network_stream")
                sock = ns.get_extra_info("socket") if ns is not None else None
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except Exception:  # noqa: BLE001 - best effort; the reader may be gone already
                pass
        try:
            self._gen.close()
        except (ValueError, RuntimeError):
            pass  # running in another thread: it ends on its own once the response is closed

    def _run(self) -> Generator[Event, None, None]:
        st, c = self.state, self._client
        while not st.done and not self._closed:
            url, params, headers = st.request()
            headers.update(c._headers)
            timeout = httpx.Timeout(c._timeout, read=c.idle_timeout)
            wait: Optional[float] = None
            try:
                with c._http.stream(
                    "GET", c.base_url + url, params=params, headers=headers, timeout=timeout
                ) as r:
                    self._response = r
                    if r.status_code == 204:
                        return  # closed, and the cursor is at its head: nothing more, ever
                    if r.status_code >= 400:
                        r.read()
                        if core.is_fatal_status(r.status_code):
                            core.raise_for(r)
                        wait = core.retry_after(r)
                    else:
                        for text in r.iter_text():
                            for ev in st.feed(text):
                                yield ev
                            if st.done:
                                return
            except httpx.TransportError:
                if self._closed:
                    return
            finally:
                self._response = None
            if self._closed:
                return
            time.sleep(max(st.reconnect_delay(), wait or 0.0))


class Writer:
    """Coalesces appends into batches, in order, on a background thread.

    :meth:`write` only queues the event (with its idempotency id); a batch is sent when
    ``max_events`` or ``max_bytes`` are queued or ``linger`` seconds after the first queued
    event, so a producer writing tokens costs one request per batch, not one per token. One
    batch is in flight at a time, so seqs follow the order of :meth:`write` calls. A failure
    (after retries) is raised by the next :meth:`write`, :meth:`flush` or :meth:`close`.
    """

    def __init__(
        self,
        client: Tailcast,
        stream: str,
        max_events: int,
        max_bytes: int,
        linger: float,
        max_pending: int,
    ) -> None:
        if not 1 <= max_events <= 1000:
            raise ValueError("max_events must be between 1 and 1000 (the server's batch limit)")
        self.stream = stream
        self._client = client
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._linger = linger
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: List[Dict[str, Any]] = []
        self._sizes: List[int] = []
        self._queued_bytes = 0
        self._first_at = 0.0
        self._inflight = 0
        self._flushing = 0
        self._closing = False
        self._error: Optional[BaseException] = None
        #: Requests sent and events acknowledged so far; the last seq acknowledged.
        self.requests = 0
        self.events = 0
        self.last_seq = 0
        self._thread = threading.Thread(target=self._run, name=f"tailcast-writer-{stream}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close()

    def write(
        self, type: str, data: Any = None, *, id: Optional[str] = None, key: Optional[str] = None
    ) -> None:
        """Queues one event (blocks only while ``max_pending`` events wait to be sent)."""
        ev = core.event_body(type, data, id, key)
        size = len(core.dumps(ev)) + 1
        with self._cond:
            self._raise_error()
            if self._closing:
                raise RuntimeError("the writer is closed")
            while len(self._queue) >= self._max_pending and self._error is None:
                self._cond.wait()
            self._raise_error()
            if not self._queue:
                self._first_at = time.monotonic()
            self._queue.append(ev)
            self._sizes.append(size)
            self._queued_bytes += size
            self._cond.notify_all()

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends everything queued now and waits until it is acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while (self._queue or self._inflight) and self._error is None:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("the writer did not drain in time")
                    self._cond.wait(left)
                self._raise_error()
            finally:
                self._flushing -= 1

    def close(self) -> None:
        """Flushes, then stops the background thread."""
        try:
            self.flush()
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _take(self) -> Optional[List[Dict[str, Any]]]:
        """Waits for a batch to be due; ``None`` when closing with nothing queued."""
        with self._cond:
            while True:
                if self._error is not None:
                    return None
                if self._queue:
                    due = self._first_at + self._linger
                    now = time.monotonic()
                    if (
                        len(self._queue) >= self._max_events
                        or self._queued_bytes >= self._max_bytes
                        or self._flushing
                        or self._closing
                        or now >= due
                    ):
                        n, size = 0, 0
                        while n < len(self._queue) and n < self._max_events:
                            if n and size + self._sizes[n] > self._max_bytes:
                                break
                            size += self._sizes[n]
                            n += 1
                        batch = self._queue[:n]
                        del self._queue[:n]
                        del self._sizes[:n]
                        self._queued_bytes -= size
                        self._first_at = time.monotonic()
                        self._inflight = len(batch)
                        self._cond.notify_all()
                        return batch
                    self._cond.wait(due - now)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                res = self._client._append(self.stream, batch, None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                with self._cond:
                    self._error = e
                    self._inflight = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self.requests += 1
                self.events += len(batch)
                self.last_seq = res.last_seq
                self._inflight = 0
                self._cond.notify_all()


class StopWatch:
    """Tells an agent when ``control.stop`` arrives on its stream.

    Follows the stream (``types=control.stop``) in a daemon thread. :attr:`stopped` turns
    true, :attr:`event` holds the ``control.stop`` event (its ``data`` has the ``reason``), the
    ``callback`` (if any) is called with it from the watcher's thread, and :meth:`wait`
    returns. The watch also ends when the stream closes. Close it when the run is over.
    """

    def __init__(
        self,
        client: Tailcast,
        stream: str,
        callback: Optional[Callable[[Event], Any]],
        after: int,
    ) -> None:
        self._flag = threading.Event()
        self._ended = threading.Event()
        self.event: Optional[Event] = None
        #: An error that ended the watch early (e.g. 403), if any.
        self.error: Optional[BaseException] = None
        self._callback = callback
        self._client = client
        self._stream = stream
        self._follow = client.follow(stream, after=after, types=[core.CONTROL_STOP])
        self._thread = threading.Thread(target=self._run, name=f"tailcast-stop-{stream}", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._flag.is_set()

    @property
    def reason(self) -> Any:
        data = self.event.data if self.event is not None else None
        return data.get("reason") if isinstance(data, dict) else None

    def ack(self, data: Any = None) -> AppendResult:
        """Tells the sender the agent has stopped (``control.stopped``, linked to the stop)."""
        if self.event is None:
            raise RuntimeError("no control.stop has arrived to acknowledge")
        return self._client.ack_stop(self._stream, self.event.seq, data)

    def refuse(self, reason: Any = None) -> AppendResult:
        """Tells the sender the agent will not stop (``control.stop_refused`` with ``reason``)."""
        if self.event is None:
            raise RuntimeError("no control.stop has arrived to refuse")
        return self._client.refuse_stop(self._stream, self.event.seq, reason)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits for the stop; True once it has arrived."""
        return self._flag.wait(timeout)

    def __enter__(self) -> "StopWatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._follow.close()

    def _run(self) -> None:
        try:
            for ev in self._follow:
                if ev.type == core.CONTROL_STOP:
                    self.event = ev
                    self._flag.set()
                    if self._callback is not None:
                        self._callback(ev)
                    return
        except BaseException as e:  # noqa: BLE001 - kept for the caller
            self.error = e
        finally:
            self._ended.set()
            self._follow.close()
