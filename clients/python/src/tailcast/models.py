"""What the API returns, as small typed objects."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional

__all__ = ["Event", "EventAck", "AppendResult", "parse_time"]


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
