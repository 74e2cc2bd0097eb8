"""Typed errors of paramserver calls, made from a call's status in one place (``from_status``).

    PsError                 every failed call: .code, .message, .reason, .info, .method
    ├── NotFound            NOT_FOUND            unknown run
    ├── InvalidArgument     INVALID_ARGUMENT     bad spec, gradient or request
    ├── ResourceExhausted   RESOURCE_EXHAUSTED   over one of the server's size limits
    │   └── OverClientLimit                      a message over this client's own --max-message-bytes
    ├── FailedPrecondition  FAILED_PRECONDITION  stale incarnation, clock ahead, run not running, ...
    ├── OutOfRange          OUT_OF_RANGE         clock beyond the run's iterations
    ├── DeadlineExceeded    DEADLINE_EXCEEDED    no answer in time, or a parked call's limit (retried)
    │   └── WatchIdle                            a watched run sent no update for the idle limit
    ├── Unavailable         UNAVAILABLE          server unreachable, shutting down, connection broke (retried)
    └── Unauthenticated     UNAUTHENTICATED      bearer token missing or wrong
    (any other code: a plain PsError carrying it)

The classes mirror the server's (``ps_server.errors``). Facts travel as fields, not prose: a server's
refusal carries a ``paramserver.v1.ErrorInfo`` (``info``; its ``reason`` is ``reason``), and
callers branch on those, never on the message's text. The transports (gRPC, the TCP data plane,
the in-memory one) only read the code, the message and the ErrorInfo off their wire; this module
turns them into exceptions. No gRPC here: the code is the number gRPC uses.
"""

from __future__ import annotations

import enum

from paramserver.v1 import paramserver_pb2 as pb

__all__ = [
    "Code",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "OverClientLimit",
    "PsError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "WatchIdle",
    "from_status",
]


class Code(enum.IntEnum):
    """The status codes, numbered as gRPC (and google.rpc.Code) number them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class PsError(Exception):
    """A call failed. ``code``: its status code; ``message``: what to fix, for people; ``info``:
    the server's ErrorInfo (an empty one when the failure is not the server's refusal, e.g. a
    broken connection); ``reason``: ``info.reason``; ``method``: the RPC."""

    retryable = False
    """Worth retrying as it is (the server may answer next time)."""

    def __init__(self, code: Code, message: str, info: pb.ErrorInfo | None = None, method: str = "") -> None:
        super().__init__(f"{method + ': ' if method else ''}{code.name}: {message}")
        self.code = code
        self.message = message
        self.info = info if info is not None else pb.ErrorInfo()
        self.method = method

    @property
    def reason(self) -> pb.ErrorReason:
        return self.info.reason


class NotFound(PsError):
    pass


class InvalidArgument(PsError):
    pass


class ResourceExhausted(PsError):
    pass


class OverClientLimit(ResourceExhausted):
    """An answer (or a request) larger than this client's own message limit: the server refused
    nothing, and the run is fine; this client cannot take part as it is set up (a worker gives its
    rank back). Raised by the transports, not sent by a server."""


class FailedPrecondition(PsError):
    pass


class OutOfRange(PsError):
    pass


class DeadlineExceeded(PsError):
    retryable = True


class WatchIdle(DeadlineExceeded):
    """Raised by ``PsClient.watch_run`` when the run sent no update for its idle limit (a run
    nobody joins): reopen the watch to keep following."""


class Unavailable(PsError):
    retryable = True


class Unauthenticated(PsError):
    pass


_BY_CODE: dict[Code, type[PsError]] = {
    Code.NOT_FOUND: NotFound,
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.FAILED_PRECONDITION: FailedPrecondition,
    Code.OUT_OF_RANGE: OutOfRange,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.UNAVAILABLE: Unavailable,
    Code.UNAUTHENTICATED: Unauthenticated,
}


def from_status(code: int, message: str, info: pb.ErrorInfo | None = None, method: str = "") -> PsError:
    """The exception for a call that ended with status ``code`` (a number of any origin)."""
    try:
        known = Code(code)
    except ValueError:
        known = Code.UNKNOWN
        message = f"status {code}: {message}"
    return _BY_CODE.get(known, PsError)(known, message, info, method)
