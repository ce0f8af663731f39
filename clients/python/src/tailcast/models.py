"""What the API returns, as small typed objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional

__all__ = [
    "Event",
    "EventAck",
    "AppendResult",
    "StopOutcome",
    "Message",
    "Messages",
    "merge_append",
    "parse_time",
]


def parse_time(raw: str) -> datetime:
    """RFC 3339 UTC with a ``Z`` (``fromisoformat`` takes ``Z`` only from Python 3.11)."""
    if raw.endswith("Z"):
        raw = raw[:-1] + "+00:00"
    return datetime.fromisoformat(raw)


@dataclass(frozen=True)
class Event:
    """One event of a stream, as delivered live and on replay."""

    stream: str
    seq: int
    type: str
    data: Any
    time: datetime
    id: Optional[str] = None
    key: Optional[str] = None
    #: The event extends the message its key names (``append=True`` when appended).
    append: bool = False
    #: Compacted follows and reads: this event stands for that many events of one message's
    #: run (the last one's seq, the merged data); None for an event of the log as it is.
    folded: Optional[int] = None
    #: Who appended it: the ``sub`` of their token (``admin`` for the admin token); None when
    #: anonymous.
    by: Optional[str] = None

    @classmethod
    def from_envelope(cls, env: Mapping[str, Any]) -> "Event":
        return cls(
            stream=env["stream"],
            seq=int(env["seq"]),
            type=env["type"],
            data=env.get("data"),
            time=parse_time(env["time"]),
            id=env.get("id"),
            key=env.get("key"),
            append=bool(env.get("append", False)),
            folded=env.get("folded"),
            by=env.get("by"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Event":
        return cls.from_envelope(json.loads(text))


@dataclass(frozen=True)
class EventAck:
    seq: int
    id: Optional[str] = None
    #: True when an event with this id was already in the log (a retry): nothing was added.
    duplicate: bool = False


@dataclass(frozen=True)
class AppendResult:
    """The answer to an append: the seqs given to the events, in order."""

    stream: str
    first_seq: int
    last_seq: int
    events: List[EventAck] = field(default_factory=list)

    @property
    def seq(self) -> int:
        """The seq of the (first) event appended."""
        return self.first_seq

    @property
    def duplicate(self) -> bool:
        """True when every event was already in the log."""
        return bool(self.events) and all(e.duplicate for e in self.events)

    @classmethod
    def from_json(cls, body: Dict[str, Any]) -> "AppendResult":
        return cls(
            stream=body["stream"],
            first_seq=int(body["first_seq"]),
            last_seq=int(body["last_seq"]),
            events=[
                EventAck(seq=int(e["seq"]), id=e.get("id"), duplicate=bool(e.get("duplicate")))
                for e in body.get("events", [])
            ],
        )


@dataclass(frozen=True)
class StopOutcome:
    """Whether a stop took effect: ``outcome`` is ``stopped`` or ``refused`` (the agent's
    answer is :attr:`event`), ``closed`` (the stream closed first: :attr:`event` is its
    ``stream.closed``; ``data["reason"] == "abandoned"`` if its lease lapsed) or ``timeout``
    (no answer in time; :attr:`event` is None)."""

    outcome: str
    event: Optional[Event] = None

    @property
    def took_effect(self) -> bool:
        """True when the run is over: stopped, or its stream closed."""
        return self.outcome in ("stopped", "closed")


def merge_append(m: Any, w: Any) -> Any:
    """Appends ``w`` to a message whose data is ``m``, by tailcast's rule: two objects merge
    field by field over ``w``'s top-level fields (two strings concatenate, anything else
    replaces); two strings concatenate; otherwise ``w`` replaces ``m``."""
    if isinstance(m, dict) and isinstance(w, dict):
        out = dict(m)
        for k, v in w.items():
            old = out.get(k)
            out[k] = old + v if isinstance(old, str) and isinstance(v, str) else v
        return out
    if isinstance(m, str) and isinstance(w, str):
        return m + w
    return w


@dataclass
class Message:
    """A message as its events build it: started by an event, extended by appends to its key."""

    key: Optional[str]
    type: str
    data: Any
    #: The seq of the last event applied to it.
    seq: int


class Messages:
    """A stream's messages, whether its events come one by one or compacted
    (``follow(..., compact=True)``): ``apply`` each event; ``list`` holds them in order."""

    def __init__(self) -> None:
        self.list: List[Message] = []
        self._open: Dict[str, Message] = {}

    def apply(self, ev: Event) -> Message:
        """Applies one event; returns the message it started or extended."""
        open_ = self._open.get(ev.key) if ev.key is not None else None
        if ev.append and open_ is not None:
            open_.data = merge_append(open_.data, ev.data)
            open_.seq = ev.seq
            return open_
        msg = Message(key=ev.key, type=ev.type, data=ev.data, seq=ev.seq)
        self.list.append(msg)
        if ev.key is not None:
            self._open[ev.key] = msg
        return msg
