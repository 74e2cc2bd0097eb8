"""``shm.put``: a message's parts into a segment's region, where a part may already be in the region:
where it goes (a gradient computed there: left as it is) or elsewhere (read before anything is
written over it). Whatever the arrangement, the region ends up holding the message. Parts are
looked for only in a message with a large one (a small message's parts are never in the region:
``PsClient.push_buffers`` gives none for a small model)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paramserver.v1 import shm

pytestmark = pytest.mark.timeout(60)

REGION = 3 * shm.IN_PLACE_BYTES


class Recording(np.ndarray):  # type: ignore[type-arg]
    """A region that records the byte ranges written into it."""

    writes: list[tuple[int, int]]

    def __setitem__(self, key: Any, value: Any) -> None:
        assert isinstance(key, slice)
        self.writes.append((key.start, key.stop))
        super().__setitem__(key, np.frombuffer(value, np.uint8))


def region() -> Recording:
    r = np.zeros(REGION, np.uint8).view(Recording)
    r.writes = []
    return r


# A part: (its size, where its bytes are: "here" (where it goes), "there" (elsewhere in the region, at an offset), "out")
parts_strategy = st.lists(
    st.tuples(st.sampled_from([7, 64, 4096, shm.IN_PLACE_BYTES // 2, shm.IN_PLACE_BYTES]),
              st.sampled_from(["here", "there", "out"]), st.integers(0, REGION - shm.IN_PLACE_BYTES)),
    min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(parts_strategy, st.integers(0, 64), st.integers(0, 2**32 - 1))
def test_the_region_holds_the_message_whatever_was_in_it(parts: list[tuple[int, str, int]], at: int, seed: int) -> None:
    total = sum(size for size, _, _ in parts)
    if at + total > REGION:
        at = 0
    if total > REGION:
        return
    r = region()
    r[:] = np.random.default_rng(seed).integers(0, 256, REGION, dtype=np.uint8)
    r.writes.clear()
    looked_for = any(size >= shm.IN_PLACE_BYTES for size, _, _ in parts)
    sources: list[memoryview] = []
    i = at
    for k, (size, where, offset) in enumerate(parts):
        if where == "here":
            sources.append(memoryview(r[i : i + size]).cast("B"))
        elif where == "there" and looked_for:  # (small messages: the parts are never the region's)
            sources.append(memoryview(r[offset : offset + size]).cast("B"))
        else:
            sources.append(memoryview(np.full(size, k, np.uint8)).cast("B"))
        i += size
    message = b"".join(bytes(v) for v in sources)  # what the parts say before anything is written
    frame = shm.put(r, at, sources, total)  # type: ignore[arg-type]  # (an array: the writes are recorded)
    assert bytes(r[at : at + total]) == message
    assert shm.REGION.unpack_from(frame, shm.FRAME.size) == (at, total)
    if looked_for:  # what was in place is not written
        i = at
        for size, where, _ in parts:
            if where == "here":
                assert not any(lo < i + size and i < hi for lo, hi in r.writes), (i, size, r.writes)
            i += size


def test_a_part_in_place_is_not_copied() -> None:
    r = region()
    head = b"\x0a\x03abc"
    data = memoryview(r[len(head) : len(head) + shm.IN_PLACE_BYTES]).cast("B")
    shm.put(r, 0, [head, data, b"\x30\x01"], len(head) + data.nbytes + 2)  # type: ignore[arg-type]
    assert r.writes == [(0, len(head)), (len(head) + data.nbytes, len(head) + data.nbytes + 2)]
