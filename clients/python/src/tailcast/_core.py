"""What the sync and async clients share: request shapes, the retry rules, and the follow
state machine (cursor, notices, exactly-once). Neither does any I/O here."""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import httpx

from .errors import (
    ApiError,
    StreamDeleted,
    StreamGap,
    StreamNotice,
    StreamReset,
    error_from_problem,
    error_from_response,
)
from .models import Event
from .sse import SSEMessage, SSEParser

#: Event types the server appends itself.
STREAM_CLOSED = "stream.closed"
CONTROL_STOP = "control.stop"
#: The agent's answers to a ``control.stop`` (data ``{"stop_seq": N}``, plus ``reason`` for a
#: refusal): producer events, not reserved.
CONTROL_STOPPED = "control.stopped"
CONTROL_STOP_REFUSED = "control.stop_refused"


def stop_answer_body(stop_seq: int, refused: bool, reason: Any, data: Any) -> Dict[str, Any]:
    """The event answering the ``control.stop`` at ``stop_seq``."""
    body: Dict[str, Any] = dict(data or {})
    body["stop_seq"] = int(stop_seq)
    if refused and reason is not None:
        body["reason"] = reason
    return {"type": CONTROL_STOP_REFUSED if refused else CONTROL_STOPPED, "data": body}


def stop_outcome_of(env: Dict[str, Any], stop_seq: int) -> Optional[str]:
    """``stopped``/``refused`` if ``env`` answers the stop at ``stop_seq``, ``closed`` if it
    closes the stream, else None."""
    data = env.get("data")
    if env["type"] in (CONTROL_STOPPED, CONTROL_STOP_REFUSED) and isinstance(data, dict):
        if data.get("stop_seq") == stop_seq:
            return "stopped" if env["type"] == CONTROL_STOPPED else "refused"
    if env["type"] == STREAM_CLOSED:
        return "closed"
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried: transport errors, 429 and 503.

    The delay before attempt *n* (from 1) is a random value in ``[0, min(max_delay,
    base_delay * 2**n)]`` ("full jitter"), or the server's ``Retry-After`` when it sent one
    (capped at ``max_delay_retry_after``). After ``attempts`` tries the last error is raised.
    """

    attempts: int = 10
    base_delay: float = 0.1
    max_delay: float = 5.0
    max_delay_retry_after: float = 60.0

    def backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 30))))

    def delay(self, attempt: int, response: Optional[httpx.Response]) -> float:
        if response is not None:
            ra = retry_after(response)
            if ra is not None:
                # A little jitter on top, so clients told the same second do not all return at once.
                return min(ra, self.max_delay_retry_after) + random.uniform(0, self.base_delay)
        return self.backoff(attempt)


def retry_after(response: httpx.Response) -> Optional[float]:
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


#: Statuses that mean "not done, try again": the request was refused before anything was stored.
RETRY_STATUSES = frozenset({429, 503})


def should_retry(response: httpx.Response, idempotent: bool) -> bool:
    """429 and 503 are refusals: nothing was done, so any request may be sent again, except
    a 503 ``outcome_unknown`` (a commit was cut off; it may have happened), which only
    requests that carry idempotency ids may resend."""
    if response.status_code not in RETRY_STATUSES:
        return False
    if idempotent:
        return True
    try:
        return bool(json.loads(response.content).get("code") != "outcome_unknown")
    except (ValueError, AttributeError):
        return True


def safe_to_resend(exc: httpx.TransportError) -> bool:
    """True when the request surely never reached the server (so even a request without an
    idempotency id may be sent again)."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


def new_id() -> str:
    return uuid.uuid4().hex


def path(stream: str, *rest: str) -> str:
    parts = [quote(stream, safe="")] + [quote(r, safe="") for r in rest]
    return "/v1/streams/" + "/".join(parts)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


EventLike = Union[Mapping[str, Any], Tuple[str, Any]]


def event_body(
    type: str, data: Any, id: Optional[str], key: Optional[str], append: bool = False
) -> Dict[str, Any]:
    """An event as the server takes it, with an idempotency id (a new one if none is given) so
    every retry of it is recognised as the same event. ``append``: it extends the message its
    ``key`` names."""
    ev: Dict[str, Any] = {"type": type, "data": data, "id": id if id is not None else new_id()}
    if key is not None:
        ev["key"] = key
    if append:
        ev["append"] = True
    return ev


def normalise_events(events: Iterable[EventLike]) -> List[Dict[str, Any]]:
    out = []
    for ev in events:
        if isinstance(ev, tuple):
            type_, data = ev
            out.append(event_body(type_, data, None, None))
        else:
            unknown = set(ev) - {"type", "data", "id", "key", "append"}
            if unknown:
                raise TypeError(f"unknown event fields: {sorted(unknown)}")
            out.append(
                event_body(
                    ev["type"],
                    ev.get("data"),
                    ev.get("id"),
                    ev.get("key"),
                    bool(ev.get("append", False)),
                )
            )
    return out


def raise_for(response: httpx.Response) -> None:
    """Raises the :class:`ApiError` for an error response (its body must have been read)."""
    if response.status_code >= 400:
        raise error_from_response(response.status_code, response.content)


def auth_headers(token: Optional[str]) -> Dict[str, str]:
    h = {"user-agent": "tailcast-python"}
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


def input_body(
    prompt: Any,
    schema: Any,
    timeout: Optional[float],
    data: Any,
    request_id: str,
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"request_id": request_id, "prompt": prompt}
    if schema is not None:
        body["schema"] = schema
    if timeout is not None:
        body["timeout_ms"] = max(1, int(round(timeout * 1000)))
    if data is not None:
        body["data"] = data
    return body


#: Longest long poll the server grants (seconds).
MAX_WAIT_S = 60


class FollowState:
    """One follow's cursor and rules, across any number of SSE connections.

    Exactly once, in order: an event is handed over only if its seq is above the cursor,
    and the cursor then moves to it; a reconnect asks for what comes after the cursor.
    """

    def __init__(
        self, stream: str, after: int, types: Optional[Sequence[str]], compact: bool = False
    ):
        if after < 0:
            raise ValueError("after must be >= 0")
        self.stream = stream
        self.cursor = after
        self.types = list(types) if types else None
        #: Each (re)connection's catch-up comes compacted (whole messages), then live events.
        self.compact = compact
        self.retry_ms = 1000
        self.failures = 0
        self.done = False
        self.parser = SSEParser()

    def request(self) -> Tuple[str, Dict[str, Any], Dict[str, str]]:
        params: Dict[str, Any] = {"after": self.cursor}
        if self.compact:
            params["compact"] = 1
        if self.types:
            types = list(self.types)
            # Without it, a filtered follow would never learn that the stream has ended.
            if STREAM_CLOSED not in types:
                types.append(STREAM_CLOSED)
            params["types"] = ",".join(types)
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        if self.cursor > 0:
            headers["last-event-id"] = str(self.cursor)
        self.parser = SSEParser()
        return path(self.stream, "sse"), params, headers

    def feed(self, text: str) -> List[Event]:
        """Parses a chunk; returns the new events to hand over. Raises a
        :class:`StreamNotice` subclass (gap, reset, deleted) or an :class:`ApiError` for an error
        notice that will not go away by reconnecting."""
        out: List[Event] = []
        msgs = self.parser.feed(text)
        if self.parser.retry is not None:
            self.retry_ms = self.parser.retry
        for msg in msgs:
            ev = self._message(msg)
            if ev is None:
                continue
            if ev.seq <= self.cursor:
                continue  # already handed over (never twice)
            self.cursor = ev.seq
            self.failures = 0
            if self.types is None or ev.type in self.types or ev.type == STREAM_CLOSED:
                out.append(ev)
            if ev.type == STREAM_CLOSED:
                self.done = True
                break
        # A bare `id:` block moves the cursor without an event (e.g. after a snapshot).
        lid = self.parser.dispatched_id.strip()
        if lid.isdigit() and int(lid) > self.cursor and not self.done:
            self.cursor = int(lid)
        return out

    def _message(self, msg: SSEMessage) -> Optional[Event]:
        if msg.event == "notice":
            try:
                notice = json.loads(msg.data)
            except ValueError:
                return None
            self._notice(notice)
            return None
        try:
            return Event.from_json(msg.data)
        except (ValueError, KeyError, TypeError):
            return None

    def _notice(self, notice: Dict[str, Any]) -> None:
        kind = notice.get("notice")
        if kind == "gap":
            raise StreamGap(notice)
        if kind == "reset":
            raise StreamReset(notice)
        if kind == "deleted":
            self.done = True
            raise StreamDeleted(notice)
        if kind == "error":
            code = notice.get("code")
            if code in ("unauthorized", "forbidden"):
                raise error_from_problem(401 if code == "unauthorized" else 403, notice)
            # Anything else ends this response; the next connection resumes from the cursor.
            return
        raise StreamNotice(notice)

    def reconnect_delay(self) -> float:
        """Jittered, growing from the server's `retry:` hint, capped at 10 s."""
        self.failures += 1
        base = max(0.05, self.retry_ms / 1000.0)
        top = min(10.0, base * (2 ** min(self.failures - 1, 10)))
        return random.uniform(top / 2, top)


def is_fatal_status(status: int) -> bool:
    """For a follow: statuses that reconnecting will not fix."""
    return 400 <= status < 500 and status not in (408, 429)


__all__ = [
    "ApiError",
    "RetryPolicy",
    "FollowState",
]
