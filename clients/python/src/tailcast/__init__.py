"""tailcast: a Python client for tailcast streams (producer, consumer, inputs and stop).

- :class:`Tailcast` (blocking) and :class:`AsyncTailcast` (asyncio) have the same methods:
  ``append``, ``append_many``, ``writer``, ``close``, ``follow``, ``read``, ``info``,
  ``ask``, ``answer``, ``stop``, ``watch_stop``, ``ack_stop``, ``refuse_stop``,
  ``wait_stop_outcome``, ``set_lease``, ``heartbeat``.
- Every error is a :class:`TailcastError`; API errors map each problem+json ``code`` to a
  class (:data:`tailcast.errors.ERROR_CODES`).
"""

from ._async import AsyncFollow, AsyncStopWatch, AsyncTailcast, AsyncWriter
from ._core import CONTROL_STOP, CONTROL_STOP_REFUSED, CONTROL_STOPPED, STREAM_CLOSED, RetryPolicy
from ._sync import Follow, StopWatch, Tailcast, Writer
from .errors import *  # noqa: F401,F403 - the exception hierarchy is part of the API
from .errors import __all__ as _errors_all
from .models import AppendResult, Event, EventAck, Message, Messages, StopOutcome, merge_append
from .sse import SSEMessage, SSEParser

__version__ = "0.1.0"

__all__ = [
    "Tailcast",
    "AsyncTailcast",
    "Writer",
    "AsyncWriter",
    "Follow",
    "AsyncFollow",
    "StopWatch",
    "AsyncStopWatch",
    "RetryPolicy",
    "Event",
    "EventAck",
    "AppendResult",
    "StopOutcome",
    "Message",
    "Messages",
    "merge_append",
    "SSEMessage",
    "SSEParser",
    "STREAM_CLOSED",
    "CONTROL_STOP",
    "CONTROL_STOPPED",
    "CONTROL_STOP_REFUSED",
    *_errors_all,
]
