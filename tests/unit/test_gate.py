"""The gate's keyed waiters: ``notify(progress)`` looks only at those whose key it reached."""

from __future__ import annotations

import asyncio

import pytest

from ps_server.core.errors import FailedPrecondition
from ps_server.core.gate import Gate

pytestmark = pytest.mark.timeout(10)


class Counter:
    """A predicate ``value >= need`` that counts how often it was asked."""

    def __init__(self, state: dict[str, int], need: int) -> None:
        self.state, self.need, self.calls = state, need, 0

    def __call__(self) -> bool:
        self.calls += 1
        if self.state.get("fail"):
            raise FailedPrecondition("the run was stopped")
        return self.state["value"] >= self.need


async def parked(gate: Gate, state: dict[str, int], needs: list[int]) -> tuple[list[Counter], list[asyncio.Task[bool]]]:
    preds = [Counter(state, n) for n in needs]
    tasks = [asyncio.create_task(gate.wait_for(p, 5.0, key=lambda p=p: p.need)) for p in preds]
    await asyncio.sleep(0)
    assert gate.statistics().waiting == len(needs)
    return preds, tasks


async def test_progress_looks_only_at_the_waiters_it_reached() -> None:
    gate, state = Gate(), {"value": 0}
    preds, tasks = await parked(gate, state, [1, 2, 3, 5])
    asked = [p.calls for p in preds]
    state["value"] = 2
    gate.notify(2)
    await asyncio.sleep(0)
    assert [p.calls - a for p, a in zip(preds, asked, strict=True)] == [1, 1, 0, 0]  # keys 3 and 5 not asked
    assert [t.done() for t in tasks] == [True, True, False, False] and gate.statistics().waiting == 2
    state["value"] = 5
    gate.notify()  # anything may have changed: every waiter is asked
    await asyncio.sleep(0)
    assert all(t.done() and t.result() for t in tasks) and gate.statistics().waiting == 0


async def test_a_waiter_whose_key_was_reached_but_not_its_predicate_waits_on() -> None:
    """(As a pending run: the min clock is there, the run has not started.)"""
    gate, state = Gate(), {"value": 0}
    (pred,), (task,) = await parked(gate, state, [1])
    pred.need = 9  # its predicate wants more than its key said, and its key says so only now
    state["value"] = 4
    gate.notify(4)  # asked (its key 1 was reached), not ready: put back under its key now, 9
    gate.notify(4)  # not asked
    gate.notify(8)  # not asked
    await asyncio.sleep(0)
    assert not task.done() and pred.calls == 2  # (the first call: wait_for's own)
    state["value"] = 9
    gate.notify(9)
    await asyncio.sleep(0)
    assert task.done() and task.result()


async def test_keyed_waiters_fail_time_out_and_are_released_like_the_others() -> None:
    gate, state = Gate(), {"value": 0}
    _, tasks = await parked(gate, state, [3, 4])
    state["fail"] = 1
    gate.notify()  # a predicate that raises fails its waiter
    await asyncio.sleep(0)
    assert all(isinstance(t.exception(), FailedPrecondition) for t in tasks)
    del state["fail"]
    assert not await gate.wait_for(Counter(state, 7), 0.05, key=lambda: 7)  # timed out
    assert gate.statistics().waiting == 0
    _, tasks = await parked(gate, state, [8])
    gate.fail_all(FailedPrecondition("shutdown"))
    await asyncio.sleep(0)
    assert isinstance(tasks[0].exception(), FailedPrecondition) and gate.statistics().waiting == 0
