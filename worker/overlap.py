"""``--overlap``: the gradient of clock c + 1 computed while the push of c is in flight.

The trainer's ``step`` asks for it when the parameters held are recent enough for c + 1 (the
bound holds). With plain SGD the gradient of c + 1 sees this rank's own step of c (read-my-writes),
taken at the whole rate before the push's answer; once the answer says the rate the server took
(a staleness-aware rate: ``PushGradientResponse.lr_scale``), the copy kept is brought to it, or
dropped when the answer does not say it. The gradient waits in ``ahead`` for the next ``step``,
unless the answer lowered the bound below what it needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import numpy as np

from paramserver.client import PullResult
from paramserver.tcp_transport import SETTLE
from paramserver.v1 import paramserver_pb2 as pb

from .rates import Factor

__all__ = ["Overlap"]

T = TypeVar("T")
Ahead = tuple[tuple[float, dict[str, np.ndarray], int, float], int | None]


class Loop(Protocol):
    """What the overlap uses of the training loop (``trainer._Trainer``): its bound, the gradient,
    and its own steps on the copy it keeps (shared with ``step``'s cache hits)."""

    staleness: int
    local_sgd_lr: float | None
    _own: int

    async def call(self, op: Callable[[], Awaitable[T]], what: str) -> T: ...
    def gradient(self, params: dict[str, np.ndarray], c: int,
                 out: dict[str, np.ndarray] | None = None) -> tuple[float, dict[str, np.ndarray], int, float]: ...
    def _computed_on(self) -> int | None: ...
    def _learn(self, staleness: int | None) -> None: ...
    def cache_valid(self, guaranteed: int, clock: int) -> bool: ...
    def own_factor(self, resp: pb.PushGradientResponse) -> Factor | None: ...
    def _drop_copy(self, params: dict[str, np.ndarray]) -> None: ...
    def _apply_own(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], factor: Factor = 1.0,
                   less: float = 0.0) -> None: ...


class Overlap:
    """The overlap of one trainer (``_Trainer._overlap``: ``--overlap``)."""

    def __init__(self, t: Loop) -> None:
        self.t = t
        self.ahead: Ahead | None = None
        """The next gradient (``gradient``'s answer) and the version it was computed on."""

    def take(self) -> Ahead | None:
        """The gradient computed ahead for the next iteration, if any (once)."""
        ahead, self.ahead = self.ahead, None
        return ahead

    def _correct_own(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], factor: Factor) -> None:
        """The own step ``run`` took at the whole rate before the push's answer, brought to
        the rate the server took (``factor`` times it): the part of the rate it did not take is
        stepped back, w - lr g + (1 - factor) lr g = w - factor lr g. In place (no copy of the model
        to step again from), so an element may differ from the server's by float32 rounding."""
        if factor != 1.0:
            self.t._apply_own(params, grads, factor, less=1.0)

    async def run(
        self, push: Callable[[], Awaitable[tuple[pb.PushGradientResponse, PullResult | None]]],
        params: dict[str, np.ndarray], grads: dict[str, np.ndarray], c: int, guaranteed: int,
    ) -> tuple[pb.PushGradientResponse, PullResult | None, float]:
        """The push of ``c`` in flight while the gradient of ``c + 1`` is computed on the parameters
        held (the caller checked they are recent enough for ``c + 1``, guaranteed clock
        ``guaranteed``). Returns the push's answer and the seconds waited for it after the
        computation. If the answer lowers the bound below what that gradient needs, it is dropped."""
        t = self.t
        token = SETTLE.set(False)  # its reads must not block the loop: the computation goes first
        try:
            task = asyncio.ensure_future(t.call(push, f"push {c}"))
        finally:
            SETTLE.reset(token)
        stepped = t.local_sgd_lr is not None  # c + 1 sees this rank's own step of c, at the whole rate
        try:
            await asyncio.sleep(0)  # the push's bytes go out (its task runs to its first wait)
            if stepped:
                t._apply_own(params, grads)
                t._own += 1
            ahead, version = t.gradient(params, c + 1), t._computed_on()  # (before the answer updates it)
            t_wait = time.perf_counter()
            resp, pulled = await task
        except BaseException:
            task.cancel()
            raise
        if resp.HasField("staleness"):
            t._learn(resp.staleness)
        if stepped and pulled is None:  # (a pull with the push replaced the copy: the server's step is in it)
            factor = t.own_factor(resp)
            if factor is None:  # the copy is not the server's (nor was the one ``ahead`` was computed on)
                t._drop_copy(params)
                return resp, pulled, time.perf_counter() - t_wait
            self._correct_own(params, grads, factor)
        if resp.clock == c + 1 and (t.staleness < 0 or t.cache_valid(guaranteed, c + 1)):
            self.ahead = ahead, version  # (a rewind raised above and leaves nothing ahead)
        return resp, pulled, time.perf_counter() - t_wait
