"""PushSlots: how many multi-message pushes are received at once, and why a stalled one can't block."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ps_server.slots import PushSlots

pytestmark = pytest.mark.timeout(30)


async def _stream(q: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    while (item := await q.get()) is not None:
        yield item


async def test_one_slot_serialises_holders_and_release_lets_the_next_in() -> None:
    slots = PushSlots(1, patience=10.0)
    a, b = slots.holder(), slots.holder()
    await a.acquire()
    waiting = asyncio.ensure_future(b.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # b waits for a's push to be applied
    a.release()
    await asyncio.wait_for(waiting, 1)
    assert b.holding and not a.holding
    b.release()
    b.release()  # idempotent: error paths may release twice
    await asyncio.wait_for(a.acquire(), 1)


async def test_a_stalled_holder_lends_its_slot_and_takes_it_back_when_data_comes() -> None:
    slots = PushSlots(1, patience=0.05)
    stalled, other = slots.holder(), slots.holder()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    it = aiter(_stream(q))
    await stalled.acquire()
    reading = asyncio.ensure_future(stalled.next(it))  # its worker went quiet mid-push
    await asyncio.wait_for(other.acquire(), 1)  # ... so after the patience another push gets in
    assert slots.lent == 1 and not stalled.holding
    q.put_nowait("chunk")
    await asyncio.sleep(0.05)
    assert not reading.done()  # its data came, but it queues for the slot like anyone else
    other.release()
    assert await asyncio.wait_for(reading, 1) == "chunk"
    assert stalled.holding


async def test_next_without_a_slot_just_reads_and_the_end_of_stream_propagates() -> None:
    slots = PushSlots(1, patience=0.05)
    h = slots.holder()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    it = aiter(_stream(q))
    q.put_nowait("x")
    assert await h.next(it) == "x"
    await h.acquire()
    q.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await h.next(it)


async def test_cancelling_a_holder_mid_read_cancels_the_read() -> None:
    slots = PushSlots(1, patience=10.0)
    h = slots.holder()
    q: asyncio.Queue[str | None] = asyncio.Queue()
    it = _stream(q)
    await h.acquire()
    task = asyncio.ensure_future(h.next(it))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    h.release()
    await asyncio.wait_for(slots.holder().acquire(), 1)  # the slot is free again


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        PushSlots(0)
