"""The worker's row cache follows SSP: rows reused while their pull's guaranteed clock is within the
staleness bound, the rest pulled; bounded; the worker's own SGD step applied to what it keeps."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.shards import ShardFactors
from paramserver.v1 import paramserver_pb2 as pb
from worker.rates import OwnRate
from worker.tables import RowCache

pytestmark = pytest.mark.timeout(30)


def ids(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def test_rows_are_reused_while_fresh_enough_and_pulled_again_after() -> None:
    cache = RowCache(dim=2, staleness=2)
    need = ids(1, 5, 9)
    assert list(cache.missing(need, 0)) == [1, 5, 9]
    pulled = np.arange(6, dtype=np.float32).reshape(3, 2)
    block = cache.block(need, 0, need, pulled, guaranteed=0)
    np.testing.assert_array_equal(block, pulled)
    assert list(cache.missing(ids(1, 5, 7), 2)) == [7]  # guaranteed 0 >= 2 - 2: fresh enough
    assert list(cache.missing(ids(1, 5, 7), 3)) == [1, 5, 7]  # 0 < 3 - 2: too old
    new = np.full((1, 2), 42, np.float32)
    block = cache.block(ids(1, 5, 7), 2, ids(7), new, guaranteed=1)
    np.testing.assert_array_equal(block, np.array([[0, 1], [2, 3], [42, 42]], np.float32))
    assert cache.hits == 2 and cache.misses == 4


@pytest.mark.parametrize("staleness", [0, -1])
def test_bsp_and_asp_never_reuse_rows(staleness: int) -> None:
    cache = RowCache(dim=1, staleness=staleness)
    cache.block(ids(3), 0, ids(3), np.ones((1, 1), np.float32), guaranteed=0)
    assert list(cache.missing(ids(3), 0)) == [3]
    assert cache.ids.size == 0  # nothing kept


def test_the_cache_keeps_the_newest_pulls_within_its_capacity() -> None:
    cache = RowCache(dim=1, staleness=100, capacity=4)
    for clock in range(3):
        got = ids(*range(3 * clock, 3 * clock + 3))
        cache.block(got, clock, got, np.full((3, 1), clock, np.float32), guaranteed=clock)
    assert cache.ids.size == 4
    assert set(cache.ids) >= {6, 7, 8}  # the last pull is kept whole
    assert bool(np.all(cache.ids[1:] > cache.ids[:-1]))  # sorted, unique


def test_the_workers_own_sgd_step_is_applied_to_the_rows_it_keeps() -> None:
    cache = RowCache(dim=2, staleness=1)
    cache.block(ids(2, 4), 0, ids(2, 4), np.ones((2, 2), np.float32), guaranteed=0)
    cache.apply_sgd(ids(4, 8), np.full((2, 2), 10, np.float32), np.float32(0.5))  # 8 is not cached
    hit, pos = cache.lookup(ids(2, 4), 1)
    assert hit.all()
    np.testing.assert_array_equal(cache.values[pos], np.array([[1, 1], [-4, -4]], np.float32))


def test_rows_of_shards_that_took_different_rates_step_each_at_its_own() -> None:
    """A table split over two servers (rows 0-3, 4-7) whose staleness for the rank differ: each
    server's rows step at the rate it took (``OwnRate.rows`` of ``Shards.factors``)."""
    shard_map = pb.ShardMap(shards=[pb.Shard(pieces=[pb.Piece(name="t", row_start=0, row_end=4)]),
                                    pb.Shard(pieces=[pb.Piece(name="t", row_start=4, row_end=8)])])
    cache = RowCache(dim=2, staleness=1)
    cache.block(ids(2, 4, 7), 0, ids(2, 4, 7), np.ones((3, 2), np.float32), guaranteed=0)
    rate = OwnRate(0.5, ShardFactors(shard_map, [1.0, 0.25]))
    touched = ids(2, 3, 4, 7)  # 3 is not cached
    cache.apply_sgd(touched, np.full((4, 2), 8, np.float32), rate.rows("t", touched))
    hit, pos = cache.lookup(ids(2, 4, 7), 1)
    assert hit.all()
    np.testing.assert_array_equal(cache.values[pos], np.array([[-3, -3], [0, 0], [0, 0]], np.float32))


def test_a_row_neither_cached_nor_pulled_is_an_error_not_garbage() -> None:
    cache = RowCache(dim=1, staleness=3)
    with pytest.raises(ValueError, match="exactly one"):
        cache.block(ids(1, 2), 0, ids(1), np.ones((1, 1), np.float32), guaranteed=0)
