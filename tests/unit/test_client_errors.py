"""How the SDK turns a call's status into its typed errors: the class, whether it is retried, the
server's reason and facts (from the ErrorInfo trailer), all at one boundary."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from paramserver import errors
from paramserver.grpc_transport import error_from_rpc
from paramserver.v1 import ERROR_TRAILER
from paramserver.v1 import paramserver_pb2 as pb


def _rpc_error(code: grpc.StatusCode, details: str, info: pb.ErrorInfo | None = None) -> AioRpcError:
    trailers = Metadata((ERROR_TRAILER, info.SerializeToString())) if info is not None else Metadata()
    return AioRpcError(code, Metadata(), trailers, details, "debug")


_REFUSAL = pb.ErrorInfo(reason=pb.ERROR_REASON_INVALID_REQUEST)


@pytest.mark.parametrize(("code", "details", "info", "cls", "retryable"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect", None, errors.Unavailable, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None, errors.DeadlineExceeded, True),
    # gRPC's own INTERNAL, without the ErrorInfo every paramserver refusal has (grpc.aio's when a
    # message cannot be sent because the connection broke, seen when the server is killed during a
    # push): not the server's answer, so as retryable as UNAVAILABLE, whatever its text says
    (grpc.StatusCode.INTERNAL, "Internal error from Core", None, errors.Unavailable, True),
    (grpc.StatusCode.INTERNAL, "any other words", None, errors.Unavailable, True),
    # CANCELLED reaches a caller only when the server cancelled the call (a server stopping does,
    # seen as a worker's ReportMetrics during a SIGTERM): retried, not a failure of the training
    (grpc.StatusCode.CANCELLED, "CANCELLED", None, errors.Unavailable, True),
    # the server's own INTERNAL (an undecodable request) and its refusals are not retried
    (grpc.StatusCode.INTERNAL, "the request does not parse", pb.ErrorInfo(reason=pb.ERROR_REASON_MALFORMED_MESSAGE),
     errors.PsError, False),
    (grpc.StatusCode.INVALID_ARGUMENT, "gradient 'w' contains 1 NaN/Inf value(s)", _REFUSAL, errors.InvalidArgument,
     False),
    (grpc.StatusCode.FAILED_PRECONDITION, "incarnation 3 of rank 0 is stale", _REFUSAL, errors.FailedPrecondition,
     False),
    (grpc.StatusCode.NOT_FOUND, "no run 'x'", _REFUSAL, errors.NotFound, False),
    (grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token", _REFUSAL, errors.Unauthenticated, False),
])
def test_class_and_retry(code: grpc.StatusCode, details: str, info: pb.ErrorInfo | None, cls: type[errors.PsError],
                         retryable: bool) -> None:
    err = error_from_rpc(_rpc_error(code, details, info), "PushGradient")
    assert type(err) is cls and err.retryable is retryable
    assert details in str(err) and "PushGradient" in str(err)
    assert err.reason == (info.reason if info is not None else pb.ERROR_REASON_UNSPECIFIED)  # never guessed from text


def test_the_reason_and_facts_come_from_the_trailer_not_the_text() -> None:
    info = pb.ErrorInfo(reason=pb.ERROR_REASON_CLOCK_AHEAD, next_clock=7)
    err = error_from_rpc(_rpc_error(grpc.StatusCode.FAILED_PRECONDITION, "words that may change", info), "PullParams")
    assert isinstance(err, errors.FailedPrecondition)
    assert err.reason == pb.ERROR_REASON_CLOCK_AHEAD and err.info.next_clock == 7


def test_from_status_maps_every_code_to_its_class() -> None:
    for code in errors.Code:
        err = errors.from_status(code.value, "m")
        assert err.code is code and isinstance(err, errors.PsError)
    assert isinstance(errors.from_status(14, "m"), errors.Unavailable)
    unknown = errors.from_status(99, "m")
    assert unknown.code is errors.Code.UNKNOWN and "99" in unknown.message


def test_watch_idle_is_a_deadline() -> None:
    assert issubclass(errors.WatchIdle, errors.DeadlineExceeded) and errors.WatchIdle.retryable


async def test_wait_ready_keeps_a_cancellation_that_comes_as_the_channel_gets_ready() -> None:
    """Regression: with ``asyncio.wait_for`` (Python 3.11, gh-86296) a task cancelled in the loop
    iteration its channel became ready went on as if never cancelled: psctl launch --local, hit by
    Ctrl-C then, trained on and never exited."""
    import asyncio

    from paramserver.grpc_transport import GrpcTransport
    from paramserver.security import Security

    transport = GrpcTransport("127.0.0.1:1", Security(), 1 << 20)
    await transport.close()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Channel:
        def channel_ready(self) -> asyncio.Future[None]:
            return ready

    transport._channel = Channel()  # type: ignore[assignment]
    waiting = asyncio.ensure_future(transport.wait_ready(5.0))
    await asyncio.sleep(0)  # it waits for the channel now
    ready.set_result(None)
    waiting.cancel()  # in the same iteration
    with pytest.raises(asyncio.CancelledError):
        await waiting


class _NoServer:
    """A transport nothing is ever sent on."""

    def stream(self, method: str) -> None:
        raise AssertionError(f"{method} was opened")

    async def unary(self, *args: object) -> None:
        raise AssertionError("a call was sent")

    async def close(self) -> None:
        pass


@pytest.mark.timeout(30)
async def test_a_wait_that_is_no_finite_number_of_seconds_is_refused_before_anything_is_sent() -> None:
    from paramserver.client import PsClient

    async with PsClient("127.0.0.1:1", transport=_NoServer()) as ps:  # type: ignore[arg-type]
        for bad in (-1.0, float("inf"), float("nan")):
            with pytest.raises(errors.InvalidArgument, match=r"max_wait=.*: .* a finite number >= 0 \(0: answer at once\)") as e:
                await ps.join("w", max_wait=bad)
            assert e.value.reason == pb.ERROR_REASON_INVALID_REQUEST and e.value.method == "Join"
            with pytest.raises(errors.InvalidArgument, match=r"\(0: the server's limit\)"):
                await ps.pull("run-x", 0, 1, 0, max_wait=bad)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("side", "request_bytes", "answer_bytes", "over_client_limit"), [
    ("client", 10, 5000, True), ("client", 5000, 10, True),  # this side's limit: an answer, a request
    ("server", 5000, 10, False), ("server", 10, 5000, False),  # the server's own gRPC limit: not this client's
], ids=["client-receives", "client-sends", "server-receives", "server-sends"])
async def test_grpcs_own_message_limit_is_told_apart_by_side(side: str, request_bytes: int, answer_bytes: int,
                                                             over_client_limit: bool) -> None:
    """gRPC's message-size refusals carry no status details and no trailer: the four are
    RESOURCE_EXHAUSTED, and only gRPC's text says whose limit it was ('CLIENT: ...'). This runs
    the real library, so an upgrade that changes that text fails here, not in a worker that would
    fail its run instead of giving its rank back (``OverClientLimit``)."""
    from paramserver.grpc_transport import channel_options

    small, large = 1000, 1 << 20
    server = grpc.aio.server(options=channel_options(large if side == "client" else small))

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"x" * answer_bytes

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.S", {"M": grpc.unary_unary_rpc_method_handler(answer)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=channel_options(small if side == "client" else large)) as ch:
            with pytest.raises(AioRpcError) as e:
                await ch.unary_unary("/t.S/M")(b"y" * request_bytes, timeout=10)
    finally:
        await server.stop(0)
    mapped = error_from_rpc(e.value, "M")
    assert isinstance(mapped, errors.ResourceExhausted) and not mapped.retryable, mapped
    assert isinstance(mapped, errors.OverClientLimit) is over_client_limit, e.value.details()
    # (the Node worker tells the server's own refusals by this, worker/node/src/client.js)
    assert e.value.details().startswith("SERVER: ") is not over_client_limit, e.value.details()
    flag = "ps-worker --max-message-bytes" if over_client_limit else "ps-server --max-message-bytes"
    assert flag in mapped.message, mapped.message  # whose limit to raise
