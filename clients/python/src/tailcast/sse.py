"""A Server-Sent Events parser (the WHATWG "event stream interpretation" algorithm).

The trap it exists for: tailcast opens every SSE response with a ``retry: <ms>`` block, which
carries no ``data``. A browser dispatches nothing for it; several Python SSE libraries hand it
over as an event with empty data, and code that ``json.loads`` every event then fails on the
very first one. Here a block without ``data`` is never an event: it only updates
:attr:`SSEParser.retry` and :attr:`SSEParser.last_event_id` (the server also sends bare
``id:`` blocks to move a cursor without an event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

__all__ = ["SSEMessage", "SSEParser"]


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched event: its ``event`` type (``"message"`` by default), its data (the
    ``data:`` lines joined with ``\\n``) and the last event id in force when it was dispatched."""

    event: str
    data: str
    id: str


class SSEParser:
    """Incremental: feed it text as it arrives (any chunking), get complete events back."""

    def __init__(self) -> None:
        self._buf = ""
        self._started = False
        self._pending_cr = False
        self._data: List[str] = []
        self._event = ""
        #: The last ``id:`` seen (the cursor to resume from), updated even by data-less blocks.
        self.last_event_id = ""
        #: The last event id in force at the end of a block (a blank line), with or without data:
        #: unlike :attr:`last_event_id`, never ahead of the events already returned.
        self.dispatched_id = ""
        #: The reconnection delay the server asked for, in milliseconds (``None`` until sent).
        self.retry: Optional[int] = None

    def feed(self, chunk: str) -> List[SSEMessage]:
        if not self._started and chunk:
            self._started = True
            if chunk.startswith("\ufeff"):
                chunk = chunk[1:]
        if self._pending_cr and chunk.startswith("\n"):
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._pending_cr = False
        self._buf += chunk
        out: List[SSEMessage] = []
        start = 0
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            c = buf[i]
            if c == "\n" or c == "\r":
                line = buf[start:i]
                if c == "\r":
                    if i + 1 < n:
                        if buf[i + 1] == "\n":
                            i += 1
                    else:
                        self._pending_cr = True
                i += 1
                start = i
                msg = self._line(line)
                if msg is not None:
                    out.append(msg)
                continue
            i += 1
        self._buf = buf[start:]
        return out

    def _line(self, line: str) -> Optional[SSEMessage]:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif field == "retry":
            if value.isdigit() and value.isascii():
                self.retry = int(value)
        return None

    def _dispatch(self) -> Optional[SSEMessage]:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        self.dispatched_id = self.last_event_id
        if not data:
            return None  # e.g. the `retry:` block: not an event
        return SSEMessage(event=event or "message", data="\n".join(data), id=self.last_event_id)
