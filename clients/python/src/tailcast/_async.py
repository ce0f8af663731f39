"""The asyncio client: :class:`AsyncTailcast` (same methods as :class:`Tailcast`, awaited)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Union

import httpx

from . import _core as core
from .errors import InputExists, InputExpired, TransportError
from .models import AppendResult, Event, StopOutcome

__all__ = ["AsyncTailcast", "AsyncWriter", "AsyncFollow", "AsyncStopWatch"]


class AsyncTailcast:
    """An asyncio tailcast client; ``async with AsyncTailcast(url, token) as tc: ...``."""

    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        *,
        timeout: float = 30.0,
        retry: core.RetryPolicy = core.RetryPolicy(),
        idle_timeout: float = 60.0,
        http: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.idle_timeout = idle_timeout
        self._timeout = timeout
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._headers = core.auth_headers(token)
        #: Requests sent again so far (after a transport error, 429 or 503): for monitoring.
        self.retries = 0

    async def __aenter__(self) -> "AsyncTailcast":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Releases the client's connections (does not touch any stream)."""
        if self._own_http:
            await self._http.aclose()

    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        params: Optional[Dict[str, Any]] = None,
        idempotent: bool,
        timeout: Optional[float] = None,
    ) -> httpx.Response:
        content = core.dumps(body) if body is not None else None
        headers = dict(self._headers)
        if content is not None:
            headers["content-type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            response: Optional[httpx.Response] = None
            try:
                response = await self._http.request(
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
            await asyncio.sleep(self.retry.delay(attempt, response))

    # -- producer ---------------------------------------------------------------------------

    async def append(
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
        return await self._append(stream, [core.event_body(type, data, id, key, append)], expected_seq)

    async def append_many(
        self,
        stream: str,
        events: Iterable[core.EventLike],
        *,
        expected_seq: Optional[int] = None,
    ) -> AppendResult:
        return await self._append(stream, core.normalise_events(events), expected_seq)

    async def _append(
        self, stream: str, events: List[Dict[str, Any]], expected_seq: Optional[int]
    ) -> AppendResult:
        params = {"expected_seq": expected_seq} if expected_seq is not None else None
        r = await self._request(
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
    ) -> "AsyncWriter":
        return AsyncWriter(self, stream, max_events, max_bytes, linger, max_pending)

    async def close(self, stream: str, reason: Any = None) -> AppendResult:
        body = {"reason": reason} if reason is not None else {}
        r = await self._request("POST", core.path(stream, "close"), body=body, idempotent=True)
        return AppendResult.from_json(r.json())

    # -- consumer ---------------------------------------------------------------------------

    def follow(
        self,
        stream: str,
        after: int = 0,
        types: Optional[Sequence[str]] = None,
        *,
        compact: bool = False,
    ) -> "AsyncFollow":
        return AsyncFollow(self, stream, after, types, compact)

    async def read(
        self,
        stream: str,
        after: int = 0,
        limit: Optional[int] = None,
        *,
        page_size: int = 1000,
        compact: bool = False,
    ) -> AsyncIterator[Event]:
        left = limit
        while left is None or left > 0:
            n = page_size if left is None else min(page_size, left)
            r = await self._request(
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

    async def info(self, stream: str) -> Dict[str, Any]:
        return dict((await self._request("GET", core.path(stream), idempotent=True)).json())

    # -- inputs and stop ----------------------------------------------------------------------

    async def ask(
        self,
        stream: str,
        prompt: Any,
        *,
        schema: Any = None,
        timeout: Optional[float] = None,
        data: Any = None,
        request_id: Optional[str] = None,
    ) -> Any:
        request_id = request_id or core.new_id()
        body = core.input_body(prompt, schema, timeout, data, request_id)
        try:
            await self._request("POST", core.path(stream, "inputs"), body=body, idempotent=True)
        except InputExists:
            pass  # an earlier attempt of ours got through before its answer was lost
        return await self.wait_answer(stream, request_id)

    async def wait_answer(self, stream: str, request_id: str) -> Any:
        while True:
            r = await self._request(
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
                raise InputExpired(
                    410,
                    "input_expired",
                    f"input request {request_id!r} expired unanswered",
                    dict(status),
                )

    async def answer(self, stream: str, request_id: str, data: Any) -> AppendResult:
        r = await self._request(
            "POST",
            core.path(stream, "inputs", request_id),
            body={"data": data},
            idempotent=False,
        )
        return AppendResult.from_json(r.json())

    async def stop(self, stream: str, reason: Any = None) -> AppendResult:
        body = {"reason": reason} if reason is not None else {}
        r = await self._request("POST", core.path(stream, "stop"), body=body, idempotent=False)
        return AppendResult.from_json(r.json())

    def watch_stop(
        self,
        stream: str,
        callback: Optional[Callable[[Event], Union[Any, Awaitable[Any]]]] = None,
        *,
        cancel: Optional["asyncio.Task[Any]"] = None,
        after: int = 0,
    ) -> "AsyncStopWatch":
        """Watches ``stream`` for ``control.stop`` in a task: :class:`AsyncStopWatch`.
        ``cancel``: a task to cancel when the stop arrives (e.g. the agent's run)."""
        return AsyncStopWatch(self, stream, callback, cancel, after)

    async def ack_stop(self, stream: str, stop_seq: int, data: Any = None) -> AppendResult:
        """The agent has stopped: appends ``control.stopped`` ``{"stop_seq": stop_seq}``."""
        ev = core.stop_answer_body(stop_seq, False, None, data)
        return await self._append(stream, [core.event_body(ev["type"], ev["data"], None, None)], None)

    async def refuse_stop(self, stream: str, stop_seq: int, reason: Any = None) -> AppendResult:
        """The agent will not stop: appends ``control.stop_refused`` with ``reason``."""
        ev = core.stop_answer_body(stop_seq, True, reason, None)
        return await self._append(stream, [core.event_body(ev["type"], ev["data"], None, None)], None)

    async def wait_stop_outcome(
        self, stream: str, stop_seq: int, timeout: float = 30.0, *, poll: float = 0.25
    ) -> StopOutcome:
        """See :meth:`tailcast.Tailcast.wait_stop_outcome`."""
        deadline = time.monotonic() + timeout
        after = stop_seq
        while True:
            r = await self._request(
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
            await asyncio.sleep(min(poll, left))

    # -- leases -------------------------------------------------------------------------------

    async def set_lease(self, stream: str, lease_s: Optional[int]) -> Dict[str, Any]:
        """See :meth:`tailcast.Tailcast.set_lease`."""
        r = await self._request("PATCH", core.path(stream), body={"lease_s": lease_s}, idempotent=True)
        return dict(r.json())

    async def heartbeat(self, stream: str) -> Dict[str, Any]:
        """Renews the stream's lease without appending."""
        r = await self._request("POST", core.path(stream, "heartbeat"), idempotent=True)
        return dict(r.json())


class AsyncFollow(AsyncIterator[Event]):
    """``async for event in tc.follow(stream, after=cursor)``: see :class:`tailcast.Follow`."""

    def __init__(
        self,
        client: AsyncTailcast,
        stream: str,
        after: int,
        types: Optional[Sequence[str]],
        compact: bool = False,
    ) -> None:
        self._client = client
        self.state = core.FollowState(stream, after, types, compact)
        self._gen = self._run()

    @property
    def cursor(self) -> int:
        return self.state.cursor

    def __aiter__(self) -> "AsyncFollow":
        return self

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def __aenter__(self) -> "AsyncFollow":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def _run(self) -> AsyncGenerator[Event, None]:
        st, c = self.state, self._client
        while not st.done:
            url, params, headers = st.request()
            headers.update(c._headers)
            timeout = httpx.Timeout(c._timeout, read=c.idle_timeout)
            wait: Optional[float] = None
            try:
                async with c._http.stream(
                    "GET", c.base_url + url, params=params, headers=headers, timeout=timeout
                ) as r:
                    if r.status_code == 204:
                        return
                    if r.status_code >= 400:
                        await r.aread()
                        if core.is_fatal_status(r.status_code):
                            core.raise_for(r)
                        wait = core.retry_after(r)
                    else:
                        async for text in r.aiter_text():
                            for ev in st.feed(text):
                                yield ev
                            if st.done:
                                return
            except httpx.TransportError:
                pass
            await asyncio.sleep(max(st.reconnect_delay(), wait or 0.0))


class AsyncWriter:
    """Coalesces appends into batches, in order, in a task: see :class:`tailcast.Writer`.

    ``w.write(...)`` queues without waiting; ``await w.flush()`` waits for acknowledgement;
    ``async with client.writer(stream) as w`` flushes at the end.
    """

    def __init__(
        self,
        client: AsyncTailcast,
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
        self._queue: List[Dict[str, Any]] = []
        self._sizes: List[int] = []
        self._queued_bytes = 0
        self._first_at = 0.0
        self._inflight = 0
        self._flushing = 0
        self._closing = False
        self._error: Optional[BaseException] = None
        self._changed = asyncio.Event()
        self._progress = asyncio.Event()
        self.requests = 0
        self.events = 0
        self.last_seq = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def __aenter__(self) -> "AsyncWriter":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def write(
        self, type: str, data: Any = None, *, id: Optional[str] = None, key: Optional[str] = None
    ) -> None:
        """Queues one event; never waits (see :meth:`drain` for back-pressure)."""
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RuntimeError("the writer is closed")
        ev = core.event_body(type, data, id, key)
        size = len(core.dumps(ev)) + 1
        if not self._queue:
            self._first_at = time.monotonic()
        self._queue.append(ev)
        self._sizes.append(size)
        self._queued_bytes += size
        self._changed.set()

    async def drain(self) -> None:
        """Waits while more than ``max_pending`` events are queued."""
        while len(self._queue) >= self._max_pending and self._error is None:
            self._progress.clear()
            await self._progress.wait()
        if self._error is not None:
            raise self._error

    async def flush(self) -> None:
        self._flushing += 1
        self._changed.set()
        try:
            while (self._queue or self._inflight) and self._error is None:
                self._progress.clear()
                await self._progress.wait()
        finally:
            self._flushing -= 1
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        try:
            await self.flush()
        finally:
            self._closing = True
            self._changed.set()
            await self._task

    async def _take(self) -> Optional[List[Dict[str, Any]]]:
        while True:
            if self._queue:
                now = time.monotonic()
                due = self._first_at + self._linger
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
                    return batch
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), due - now)
                except asyncio.TimeoutError:
                    pass
            elif self._closing:
                return None
            else:
                self._changed.clear()
                await self._changed.wait()

    async def _run(self) -> None:
        while True:
            batch = await self._take()
            if batch is None:
                return
            try:
                res = await self._client._append(self.stream, batch, None)
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._error = e
                self._inflight = 0
                self._progress.set()
                return
            self.requests += 1
            self.events += len(batch)
            self.last_seq = res.last_seq
            self._inflight = 0
            self._progress.set()


class AsyncStopWatch:
    """Tells an asyncio agent when ``control.stop`` arrives on its stream.

    ``await watch.wait()`` returns the ``control.stop`` event (``None`` if the stream closed
    first); :attr:`stopped` and :attr:`reason` read it; ``callback`` (sync or async) is called
    with it; ``cancel`` (a task) is cancelled. ``async with`` or :meth:`aclose` ends the watch.
    """

    def __init__(
        self,
        client: AsyncTailcast,
        stream: str,
        callback: Optional[Callable[[Event], Union[Any, Awaitable[Any]]]],
        cancel: Optional["asyncio.Task[Any]"],
        after: int,
    ) -> None:
        self.event: Optional[Event] = None
        self._callback = callback
        self._cancel = cancel
        self._client = client
        self._stream = stream
        self._follow = client.follow(stream, after=after, types=[core.CONTROL_STOP])
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def stopped(self) -> bool:
        return self.event is not None

    @property
    def reason(self) -> Any:
        data = self.event.data if self.event is not None else None
        return data.get("reason") if isinstance(data, dict) else None

    async def ack(self, data: Any = None) -> AppendResult:
        """Tells the sender the agent has stopped (``control.stopped``, linked to the stop)."""
        if self.event is None:
            raise RuntimeError("no control.stop has arrived to acknowledge")
        return await self._client.ack_stop(self._stream, self.event.seq, data)

    async def refuse(self, reason: Any = None) -> AppendResult:
        """Tells the sender the agent will not stop (``control.stop_refused`` with ``reason``)."""
        if self.event is None:
            raise RuntimeError("no control.stop has arrived to refuse")
        return await self._client.refuse_stop(self._stream, self.event.seq, reason)

    async def wait(self) -> Optional[Event]:
        """Waits for the stop (or the end of the stream); raises what ended the watch."""
        return await asyncio.shield(self._task)

    async def __aenter__(self) -> "AsyncStopWatch":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if not self._task.done():
            self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
            pass

    async def _run(self) -> Optional[Event]:
        try:
            async for ev in self._follow:
                if ev.type == core.CONTROL_STOP:
                    self.event = ev
                    if self._cancel is not None:
                        self._cancel.cancel()
                    if self._callback is not None:
                        result = self._callback(ev)
                        if inspect.isawaitable(result):
                            await result
                    return ev
            return None
        finally:
            await self._follow.aclose()
