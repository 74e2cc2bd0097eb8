"""The SDK's side of the C exchange: a small dense model's push with its pull, in one call.

``PsClient.push_pull`` and ``push_pull_now`` hand the push of a small dense model whose pull
writes into arrays of the caller's, on the shared-memory data plane, to ``Exchange.push_pull``
when the C exchange is built (``shm_transport.native``): it keeps what every such push repeats
(the tensors' chunk prefixes, the names and arrays to pull into) and calls
``ShmCall.push_pull_now``, which writes the request, sends it, and decodes its answer when it
comes within the settle time. The same bytes as the Python path's both ways, with a third less of
the worker's CPU per push outside the gradient (bench/RESULTS.md, Performance round 2, section 19).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import wire
from paramserver.v1.shm import MESSAGE_BYTES

from . import errors
from .shm_transport import ShmCall, native
from .sink import PullResult
from .streams import Stream

__all__ = ["Answer", "Exchange", "ack", "pulled"]

# A push's answer the C exchange decoded, ``_exchange.Answer``: a named tuple of the acknowledgement's
# clock, duplicate, min_clock, run_state, staleness and lr_scale, the pull's guaranteed_clock,
# version, final, pulled_run_state, lineage and pulled_staleness, then answer_at and answer_len in
# the segment (the optional fields None when absent). Without the C exchange: a type no answer has.
if native is not None:
    Answer = native.Answer
else:
    Answer = type("Answer", (tuple,), {})  # type: ignore[misc]


def ack(got: Answer) -> pb.PushGradientResponse:
    """The acknowledgement an ``Answer`` holds, as ``push_pull`` returns it."""
    return pb.PushGradientResponse(clock=got.clock, duplicate=got.duplicate, min_clock=got.min_clock,
                                   run_state=got.run_state, staleness=got.staleness,  # type: ignore[arg-type]
                                   lr_scale=got.lr_scale)


def pulled(got: Answer, into: dict[str, np.ndarray]) -> PullResult:
    """The pull an ``Answer`` holds (its tensors written into ``into``), as ``push_pull`` returns it."""
    return PullResult(got.guaranteed_clock, got.version, got.pulled_run_state, into, {}, got.lineage, False,
                      got.pulled_staleness)


class Exchange:
    """The C exchange of one client's push stream, and what it keeps from push to push."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._layout: tuple[tuple[str, ...], tuple[tuple[int, ...], ...], tuple[bytes, ...], int] | None = None
        """The last push's tensors: names, shapes, chunk prefixes, their bytes with the data."""
        self._held: tuple[dict[str, np.ndarray], tuple[str, ...], tuple[np.ndarray, ...], tuple[bytes, ...]] | None = None
        """The arrays the last push pulled into: the dict, its names, arrays, names encoded."""
        self._checked: tuple[np.ndarray, ...] = ()
        """The last push's gradient arrays, found laid out as ``_layout`` (a worker that computes
        its gradients into the same arrays every time pushes these again: their shapes and types
        are not looked at again; held here, no other array can take their place)."""

    def push_pull(
        self, run_id: str, rank: int, incarnation: int, clock: int, grads: Mapping[str, Any], loss: float,
        wait: float, since: tuple[int, int] | None, param_version: int | None, into: dict[str, np.ndarray],
    ) -> Any:
        """The push of ``clock`` with the pull of ``clock + 1`` into ``into`` (``wait``: its
        max_wait, checked), by the C exchange, when the stream's call is on shared memory: its
        ``Answer``; or the bytes of the answer's first response (one the C side leaves to the
        sink); or True when the request went and its answer is to be read (``Stream.exchange``
        of no requests); False when nothing went (not such a push, or not now: the caller sends
        it). A stream that broke is closed (the next operation opens another, as after any)
        and its error raised."""
        call = self._stream.idle_call()
        if type(call) is not ShmCall:
            return False
        layout = self._layout
        if layout is None or layout[0] != tuple(grads):
            whole = wire.whole_group(grads, MESSAGE_BYTES)
            found = None if whole is None else wire.chunk_prefixes(whole)
            if whole is None or found is None:
                return False
            layout = self._layout = (tuple(grads), tuple(shape for _, shape, _, _ in whole), found,
                                     sum(map(len, found)) + sum(data.nbytes for _, _, _, data in whole))
            self._checked = ()
        _, shapes, prefixes, fixed = layout
        values: tuple[np.ndarray, ...] = tuple(grads.values())
        checked = self._checked
        if len(values) != len(checked) or not all(map(operator.is_, values, checked)):  # (not checked already)
            for a, shape in zip(values, shapes, strict=True):
                if type(a) is not np.ndarray or a.shape != shape or a.dtype != wire.F32 or not a.flags.c_contiguous:
                    self._layout = None  # (another model's, maybe: the next push lays it out anew)
                    return False
            self._checked = values
        held = self._held
        if held is None or held[0] is not into or len(held[2]) != len(into) or \
                not all(map(operator.is_, into.values(), held[2])):
            if not all(type(a) is np.ndarray and a.dtype == wire.F32 and a.flags.c_contiguous and a.flags.writeable
                       for a in into.values()):
                return False  # (the sink replaces such arrays: the Python path)
            held = self._held = (into, tuple(into), tuple(into.values()), tuple(k.encode() for k in into))
        head, pull, wait_field = wire.push_fields(run_id, rank, incarnation), wire.pull_fields(run_id, rank, incarnation), \
            wire.wait_field(wait)
        n = len(head) + fixed + len(pull) + len(wait_field) + 80  # (at most: the varints, loss and final besides)
        try:
            return call.push_pull_now(n, head, clock, values, prefixes, loss, pull, wait_field, since, param_version,
                                      held[3], held[2])
        except errors.PsError:
            self._stream.close()
            raise
