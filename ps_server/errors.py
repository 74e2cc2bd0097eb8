"""The server's domain errors, mapped to gRPC status codes in exactly one place (``codec``).

    PsError
    ├── NotFound              unknown run, unknown tensor name          → NOT_FOUND
    ├── InvalidArgument       bad spec, wrong shape/dtype/length, NaN   → INVALID_ARGUMENT
    ├── ResourceExhausted     too large                                 → RESOURCE_EXHAUSTED
    ├── FailedPrecondition    stale incarnation, run not running, ...   → FAILED_PRECONDITION
    ├── OutOfRange            clock beyond the run's iterations         → OUT_OF_RANGE
    ├── WaitTimeout           a parked pull passed the server's limit   → DEADLINE_EXCEEDED
    └── ShuttingDown          the server is stopping                    → UNAVAILABLE

Every message says what the caller should fix. Raising one of these never leaves partial state:
core methods validate everything before they mutate anything.
"""

from __future__ import annotations

__all__ = [
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PsError",
    "ResourceExhausted",
    "ShuttingDown",
    "WaitTimeout",
]


class PsError(Exception):
    """Base of all errors the server reports to its callers."""


class NotFound(PsError):
    pass


class InvalidArgument(PsError):
    pass


class ResourceExhausted(PsError):
    pass


class FailedPrecondition(PsError):
    pass


class OutOfRange(PsError):
    pass


class WaitTimeout(PsError):
    pass


class ShuttingDown(PsError):
    pass
