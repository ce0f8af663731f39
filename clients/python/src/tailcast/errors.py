"""One exception hierarchy for everything the client raises.

Every API error is `application/problem+json` with a stable ``code`` (openapi.yaml,
``ErrorCode``); :func:`error_from_response` turns one into the class registered for its code,
falling back to the class for its HTTP status, so ``except tailcast.Conflict`` catches every 409
and ``except tailcast.SeqConflict`` only the one that carries ``head``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Type

__all__ = [
    "TailcastError",
    "TransportError",
    "ApiError",
    "BadRequest",
    "InvalidStreamName",
    "InvalidEvent",
    "ReservedType",
    "InvalidJson",
    "EmptyBatch",
    "InvalidParameter",
    "InvalidCursor",
    "InvalidSchema",
    "InvalidMessage",
    "NestingTooDeep",
    "UnknownOp",
    "MissingField",
    "InvalidField",
    "UnknownField",
    "BinaryNotSupported",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "StreamNotFound",
    "InputNotFound",
    "RouteNotFound",
    "WebhookNotFound",
    "NotSubscribed",
    "MethodNotAllowed",
    "NotAcceptable",
    "RequestTimeout",
    "Conflict",
    "SeqConflict",
    "StreamClosed",
    "InputAlreadyAnswered",
    "InputExists",
    "AlreadySubscribed",
    "InputExpired",
    "TooLarge",
    "EventTooLarge",
    "BatchTooLarge",
    "PayloadTooLarge",
    "SnapshotTooLarge",
    "UriTooLong",
    "HeadersTooLarge",
    "InputInvalid",
    "UpgradeRequired",
    "TooManyRequests",
    "RateLimited",
    "TooManyConnections",
    "TooManySubscriptions",
    "ServerError",
    "InternalServerError",
    "Unavailable",
    "ShuttingDown",
    "OutcomeUnknown",
    "StreamExists",
    "ContentTypeMismatch",
    "WriterSeqConflict",
    "ProducerSeqGap",
    "StaleProducerEpoch",
    "StreamGone",
    "OffsetGone",
    "StreamNotice",
    "StreamGap",
    "StreamReset",
    "StreamDeleted",
    "ERROR_CODES",
    "error_from_response",
    "error_from_problem",
]


class TailcastError(Exception):
    """Base class of every error this package raises."""


class TransportError(TailcastError):
    """The server could not be reached (or the connection broke) and retries ran out, or the
    request was not safe to resend. The original ``httpx`` error is ``__cause__``."""


class ApiError(TailcastError):
    """The server answered with an error (problem+json)."""

    #: The problem's stable code (``None`` if the body was not problem+json).
    code: Optional[str]
    status: int
    detail: str
    #: The whole problem object, including extra fields (``head``, ``limit``, ...).
    problem: Dict[str, Any]

    def __init__(self, status: int, code: Optional[str], detail: str, problem: Dict[str, Any]):
        super().__init__(f"{status} {code or 'error'}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.problem = problem


# 400
class BadRequest(ApiError):
    """400: the request is malformed."""


class InvalidStreamName(BadRequest):
    pass


class InvalidEvent(BadRequest):
    pass


class ReservedType(BadRequest):
    """Producers may not append server-only types (``stream.closed``, ``input.*``, ...)."""


class InvalidJson(BadRequest):
    pass


class EmptyBatch(BadRequest):
    pass


class InvalidParameter(BadRequest):
    pass


class InvalidCursor(BadRequest):
    pass


class InvalidSchema(BadRequest):
    """:meth:`ask` was given something that is not a JSON Schema."""


class InvalidMessage(BadRequest):
    pass


class NestingTooDeep(BadRequest):
    pass


class UnknownOp(BadRequest):
    pass


class MissingField(BadRequest):
    pass


class InvalidField(BadRequest):
    pass


class UnknownField(BadRequest):
    pass


class BinaryNotSupported(BadRequest):
    pass


# 401, 403
class Unauthorized(ApiError):
    """401: no valid token (or it expired)."""


class Forbidden(ApiError):
    """403: the token has no grant for this stream or action."""


# 404, 405, 406, 408
class NotFound(ApiError):
    pass


class StreamNotFound(NotFound):
    pass


class InputNotFound(NotFound):
    pass


class RouteNotFound(NotFound):
    """``not_found``: no such route (a wrong base URL?)."""


class WebhookNotFound(NotFound):
    pass


class NotSubscribed(NotFound):
    pass


class MethodNotAllowed(ApiError):
    pass


class NotAcceptable(ApiError):
    pass


class RequestTimeout(ApiError):
    pass


# 409
class Conflict(ApiError):
    pass


class SeqConflict(Conflict):
    """``expected_seq`` did not match; :attr:`head` is the stream's head."""

    @property
    def head(self) -> Optional[int]:
        return self.problem.get("head")

    @property
    def expected_seq(self) -> Optional[int]:
        return self.problem.get("expected_seq")


class StreamClosed(Conflict):
    """The stream is closed; :attr:`head` is its last seq."""

    @property
    def head(self) -> Optional[int]:
        return self.problem.get("head")


class InputAlreadyAnswered(Conflict):
    pass


class InputExists(Conflict):
    pass


class AlreadySubscribed(Conflict):
    pass


# The Durable Streams surface (/v1/stream/...; docs/durable-streams.md).
class StreamExists(Conflict):
    """A Durable Streams stream exists already with another configuration."""


class ContentTypeMismatch(Conflict):
    """The append's content type is not the Durable Streams stream's."""


class WriterSeqConflict(Conflict):
    """``Stream-Seq`` is not after the last one accepted."""


class ProducerSeqGap(Conflict):
    """An idempotent producer's sequence number skipped ahead."""


class StaleProducerEpoch(Forbidden):
    """An idempotent producer's epoch is older than the current one."""


class StreamGone(ApiError):
    """410: the Durable Streams stream was deleted or expired."""


class OffsetGone(ApiError):
    """410: the offset is before what retention kept."""


# 410
class InputExpired(ApiError):
    """The input request expired before it was answered."""


# 413, 414, 431
class TooLarge(ApiError):
    @property
    def limit(self) -> Optional[int]:
        return self.problem.get("limit")


class EventTooLarge(TooLarge):
    pass


class BatchTooLarge(TooLarge):
    pass


class PayloadTooLarge(TooLarge):
    pass


class SnapshotTooLarge(TooLarge):
    """The newest events per key are over the server's ``--max-snapshot-bytes``."""


class UriTooLong(TooLarge):
    pass


class HeadersTooLarge(TooLarge):
    pass


# 422, 426
class InputInvalid(ApiError):
    """The answer does not match the request's JSON Schema."""


class UpgradeRequired(ApiError):
    pass


# 429
class TooManyRequests(ApiError):
    @property
    def retry_after(self) -> Optional[float]:
        v = self.problem.get("retry_after_s")
        return float(v) if isinstance(v, (int, float)) else None


class RateLimited(TooManyRequests):
    pass


class TooManyConnections(TooManyRequests):
    pass


class TooManySubscriptions(TooManyRequests):
    pass


# 5xx
class ServerError(ApiError):
    pass


class InternalServerError(ServerError):
    pass


class Unavailable(ServerError):
    """503: the event log cannot be reached; nothing was stored. Retried automatically."""


class ShuttingDown(ServerError):
    """503: the server is shutting down. Retried automatically."""


class OutcomeUnknown(ServerError):
    """503: the database was lost mid-commit; the events may or may not be stored. Appends are
    retried automatically (with the same ids, so never doubled); requests without an id are
    not, and raise this."""


# Notices on a followed stream (SSE ``event: notice``).
class StreamNotice(TailcastError):
    """The server could not continue a follow from the cursor as given."""

    def __init__(self, notice: Dict[str, Any]):
        super().__init__(f"{notice.get('notice')}: {notice.get('detail', '')}")
        self.notice = notice
        self.stream: str = notice.get("stream", "")
        self.detail: str = notice.get("detail", "")


class StreamGap(StreamNotice):
    """Events after the cursor were removed by retention. :attr:`oldest` is the first seq still
    held: follow again with ``after=oldest - 1`` to continue past the gap."""

    @property
    def oldest(self) -> Optional[int]:
        return self.notice.get("oldest")


class StreamReset(StreamNotice):
    """The cursor is past the stream's head (the stream was deleted and recreated, or the
    cursor belongs to another server). :attr:`head` is the stream's head."""

    @property
    def head(self) -> Optional[int]:
        return self.notice.get("head")


class StreamDeleted(StreamNotice):
    """The stream was deleted while it was followed."""


#: Every problem+json ``code`` of openapi.yaml, and the class raised for it.
ERROR_CODES: Dict[str, Type[ApiError]] = {
    "invalid_stream_name": InvalidStreamName,
    "invalid_event": InvalidEvent,
    "reserved_type": ReservedType,
    "invalid_json": InvalidJson,
    "empty_batch": EmptyBatch,
    "invalid_parameter": InvalidParameter,
    "invalid_cursor": InvalidCursor,
    "invalid_schema": InvalidSchema,
    "invalid_message": InvalidMessage,
    "nesting_too_deep": NestingTooDeep,
    "unknown_op": UnknownOp,
    "missing_field": MissingField,
    "invalid_field": InvalidField,
    "unknown_field": UnknownField,
    "binary_not_supported": BinaryNotSupported,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "stream_not_found": StreamNotFound,
    "input_not_found": InputNotFound,
    "not_found": RouteNotFound,
    "webhook_not_found": WebhookNotFound,
    "not_subscribed": NotSubscribed,
    "method_not_allowed": MethodNotAllowed,
    "not_acceptable": NotAcceptable,
    "request_timeout": RequestTimeout,
    "seq_conflict": SeqConflict,
    "stream_closed": StreamClosed,
    "input_already_answered": InputAlreadyAnswered,
    "input_exists": InputExists,
    "already_subscribed": AlreadySubscribed,
    "input_expired": InputExpired,
    "event_too_large": EventTooLarge,
    "batch_too_large": BatchTooLarge,
    "payload_too_large": PayloadTooLarge,
    "snapshot_too_large": SnapshotTooLarge,
    "uri_too_long": UriTooLong,
    "headers_too_large": HeadersTooLarge,
    "input_invalid": InputInvalid,
    "upgrade_required": UpgradeRequired,
    "rate_limited": RateLimited,
    "too_many_connections": TooManyConnections,
    "too_many_subscriptions": TooManySubscriptions,
    "internal": InternalServerError,
    "unavailable": Unavailable,
    "shutting_down": ShuttingDown,
    "outcome_unknown": OutcomeUnknown,
    "stream_exists": StreamExists,
    "content_type_mismatch": ContentTypeMismatch,
    "writer_seq_conflict": WriterSeqConflict,
    "producer_seq_gap": ProducerSeqGap,
    "stale_producer_epoch": StaleProducerEpoch,
    "stream_gone": StreamGone,
    "offset_gone": OffsetGone,
}

_BY_STATUS: Dict[int, Type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    406: NotAcceptable,
    408: RequestTimeout,
    409: Conflict,
    410: InputExpired,
    413: TooLarge,
    414: UriTooLong,
    422: InputInvalid,
    426: UpgradeRequired,
    429: TooManyRequests,
    431: HeadersTooLarge,
    503: Unavailable,
}


def error_from_problem(status: int, problem: Dict[str, Any]) -> ApiError:
    """The exception for a problem object (also used for notices with a ``code``)."""
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    cls = ERROR_CODES.get(code or "")
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = str(problem.get("title") or "")
    return cls(status, code, detail, problem)


def error_from_response(status: int, body: bytes) -> ApiError:
    """The exception for an error response, problem+json or not."""
    problem: Dict[str, Any]
    try:
        parsed = json.loads(body) if body else {}
        problem = parsed if isinstance(parsed, dict) else {"detail": str(parsed)}
    except ValueError:
        problem = {"detail": body[:500].decode("utf-8", "replace")}
    return error_from_problem(status, problem)
