"""How the worker's client classifies gRPC failures: retried (the worker rides them out) or not."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from worker.client import PsClientError


def _error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details, "debug")


@pytest.mark.parametrize(("code", "details", "retryable"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect", True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", True),
    # grpc.aio's status when a message cannot be sent because the connection broke (seen when the
    # server is killed during a push): not the server's answer, so as retryable as UNAVAILABLE
    (grpc.StatusCode.INTERNAL, "Internal error from Core", True),
    # the server's own INTERNAL (an undecodable request) and its refusals are not retried
    (grpc.StatusCode.INTERNAL, "Exception deserializing request!", False),
    (grpc.StatusCode.INVALID_ARGUMENT, "gradient 'w' contains 1 NaN/Inf value(s)", False),
    (grpc.StatusCode.FAILED_PRECONDITION, "incarnation 3 of rank 0 is stale", False),
])
def test_retryable(code: grpc.StatusCode, details: str, retryable: bool) -> None:
    err = PsClientError.from_rpc(_error(code, details), "PushGradient")
    assert err.retryable is retryable
    assert details in str(err) and "PushGradient" in str(err)
