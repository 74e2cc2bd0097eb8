"""The server's domain errors, each with a status code and a machine-readable reason.

    PsError                                                          code
    ├── NotFound              unknown run                            NOT_FOUND
    ├── InvalidArgument       bad spec, gradient or request          INVALID_ARGUMENT
    ├── ResourceExhausted     over a size limit                      RESOURCE_EXHAUSTED
    ├── FailedPrecondition    stale incarnation, clock ahead, ...    FAILED_PRECONDITION
    ├── OutOfRange            clock beyond the run's iterations      OUT_OF_RANGE
    ├── WaitTimeout           a parked call passed its limit         DEADLINE_EXCEEDED
    ├── ShuttingDown          the server is stopping                 UNAVAILABLE
    └── Malformed             a message that does not parse          INTERNAL

``code`` is the status code's number (as gRPC numbers them); ``reason`` names the cause for
programs (``paramserver.v1.ErrorReason``, same names) and the keyword facts travel with it (the
proto's ``ErrorInfo``). The message says what the caller should fix, for people; clients never
read it. It stays short whatever the request holds: lists through ``listed`` (a few, then "and N
more"), echoed input through ``quoted`` (cut). Each transport turns an error into its status
through ``codec.error_status``, the one mapping. Raising one of these never leaves partial state: core methods validate everything before
they mutate anything.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence

__all__ = [
    "FailedPrecondition",
    "counted",
    "listed",
    "quoted",
    "InvalidArgument",
    "Malformed",
    "NotFound",
    "OutOfRange",
    "PsError",
    "Reason",
    "ResourceExhausted",
    "ShardUnavailable",
    "ShuttingDown",
    "WaitTimeout",
    "shortened",
]


def counted(n: int, noun: str) -> str:
    """'1 rank', '4 ranks': a count and its noun, in the singular for one."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def listed(items: Iterable[object], limit: int = 5) -> str:
    """``a, b, c`` -- at most ``limit`` items, then "and N more": a message never grows with a count."""
    items = list(items)
    shown = ", ".join(map(str, items[:limit])) or "none"
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def shortened(text: str, limit: int = 1024) -> str:
    """``text`` cut to ``limit`` characters, saying how many more it had: a message a caller gives
    the server to keep (a leave's, a stop's reason) stays short."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def quoted(text: str, limit: int = 64) -> str:
    """``repr(text)``, cut to ``limit`` characters: input echoed in a message stays short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


class Reason(enum.Enum):
    """Why a call was refused; each is ``ERROR_REASON_<name>`` in the proto, documented there."""

    UNSPECIFIED = "unspecified"
    RUN_NOT_FOUND = "run_not_found"
    INVALID_SPEC = "invalid_spec"
    INVALID_GRADIENT = "invalid_gradient"
    INVALID_REQUEST = "invalid_request"
    MALFORMED_MESSAGE = "malformed_message"
    TOO_LARGE = "too_large"
    STALE_INCARNATION = "stale_incarnation"
    CLOCK_AHEAD = "clock_ahead"
    STALENESS_BOUND = "staleness_bound"
    RUN_NOT_RUNNING = "run_not_running"
    NO_VACANT_RANK = "no_vacant_rank"
    NO_DATA_DIR = "no_data_dir"
    CLOCK_OUT_OF_RANGE = "clock_out_of_range"
    WAIT_TIMEOUT = "wait_timeout"
    SHUTTING_DOWN = "shutting_down"
    STREAM_LIMIT = "stream_limit"
    UNSUPPORTED = "unsupported"
    UNAUTHENTICATED = "unauthenticated"
    RUN_NOT_FINISHED = "run_not_finished"
    SHARD_UNAVAILABLE = "shard_unavailable"
    CANNOT_TRAIN = "cannot_train"


class PsError(Exception):
    """Base of all errors the server reports to its callers."""

    code = 13  # INTERNAL: a bare PsError is the server's fault
    reason = Reason.UNSPECIFIED

    def __init__(self, message: str, reason: Reason | None = None, *, next_clock: int | None = None,
                 run_state: str = "", needed_min_clock: int | None = None, ranks_behind: Sequence[int] = ()) -> None:
        """``next_clock`` (CLOCK_AHEAD), ``run_state`` (RUN_NOT_RUNNING, a ``RunState`` value),
        ``needed_min_clock`` and ``ranks_behind`` (STALENESS_BOUND, WAIT_TIMEOUT): the facts."""
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.next_clock = next_clock
        self.run_state = run_state
        self.needed_min_clock = needed_min_clock
        self.ranks_behind = tuple(ranks_behind)


class NotFound(PsError):
    code = 5
    reason = Reason.RUN_NOT_FOUND


class InvalidArgument(PsError):
    code = 3
    reason = Reason.INVALID_REQUEST


class ResourceExhausted(PsError):
    code = 8
    reason = Reason.TOO_LARGE


class FailedPrecondition(PsError):
    code = 9


class OutOfRange(PsError):
    code = 11
    reason = Reason.CLOCK_OUT_OF_RANGE


class WaitTimeout(PsError):
    code = 4
    reason = Reason.WAIT_TIMEOUT


class ShuttingDown(PsError):
    code = 14
    reason = Reason.SHUTTING_DOWN


class ShardUnavailable(PsError):
    """Another server of the cluster did not answer (the message names it)."""

    code = 14
    reason = Reason.SHARD_UNAVAILABLE


class Malformed(PsError):
    code = 13
    reason = Reason.MALFORMED_MESSAGE
