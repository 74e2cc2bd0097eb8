"""Work that outlives the call that started it (``ps_server.background``)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from ps_server.background import Background

pytestmark = pytest.mark.timeout(10)


async def test_work_a_caller_cancelled_twice_let_go_of_is_kept_until_it_ends() -> None:
    """A caller of ``landed`` cancelled, then cancelled again while it waits for the work, returns at
    once; the work goes on, held (the loop holds tasks weakly: a task nothing refers to, waiting on a
    future only it refers to, is collected mid-way, 'Task was destroyed but it is pending')."""
    background = Background()
    loop = asyncio.get_running_loop()
    waits_on: list[weakref.ref[asyncio.Future[None]]] = []
    started, ended = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        future = loop.create_future()
        waits_on.append(weakref.ref(future))
        started.set()
        await future
        ended.set()

    caller = asyncio.ensure_future(background.landed(work()))
    await started.wait()
    caller.cancel()
    await asyncio.sleep(0)  # (the caller now waits for the work to end)
    assert not caller.done()
    caller.cancel()
    await asyncio.wait({caller})  # (not ``pytest.raises``: its traceback would hold the work)
    assert caller.cancelled()
    del caller
    gc.collect()
    future = waits_on[0]()
    assert future is not None, "the work was collected before it ended"
    assert len(background) == 1
    future.set_result(None)
    await asyncio.wait_for(ended.wait(), 5)
    await asyncio.sleep(0)  # (its done callback)
    assert len(background) == 0


async def test_settle_waits_for_the_work_under_way_and_cancels_what_is_late() -> None:
    """``settle`` waits for work that ends in time, even work started meanwhile; what is still under
    way then is cancelled, and its own clean-up (a deletion writing down whom it did not tell) runs."""
    background = Background()
    finished: list[str] = []
    go = asyncio.Event()

    async def quick() -> None:
        await go.wait()
        background.start(later())
        finished.append("quick")

    async def later() -> None:
        await asyncio.sleep(0)
        finished.append("later")

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # (its clean-up awaits too)
            finished.append("stuck, cancelled")
            raise

    background.start(quick())
    background.start(stuck())
    loop = asyncio.get_running_loop()
    loop.call_soon(go.set)
    before = loop.time()
    await background.settle(0.3)
    assert sorted(finished) == ["later", "quick", "stuck, cancelled"]
    assert len(background) == 0 and loop.time() - before < 2
