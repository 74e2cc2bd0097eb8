"""Where a run's tensors live when several servers hold its parameters (the shard map).

Rule (``place``), deterministic, so every server and a checkpoint agree on it:

1. A tensor of more than ``split_bytes``, and every table (``ParamSpec.table``), with at least two
   rows (dimension 0) is split into one row range per shard, as equal as the rows allow (the first
   ``rows % n`` ranges get one more), range j on shard j: a 100M-parameter matrix is spread over
   every server, and so are a table's rows (whose ids workers hash, so ranges get equal traffic).
2. The other tensors are placed whole, largest first (ties by name), each on the shard holding the
   fewest bytes so far (ties: the lowest index): balanced by bytes.

A piece is a row range ``[start, end)`` of its tensor, which in the C order of the wire is one
contiguous range of elements. On a shard it is a tensor of the same name with shape
``(end - start, *shape[1:])`` (a scalar is one row), whose initial values are those rows of the
whole tensor's values (``piece_specs``: the same random stream, the earlier rows skipped), so a
run's starting point does not depend on how many servers hold it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .spec import ParamSpec

__all__ = ["Piece", "Placement", "ShardMap", "check_map", "piece_specs", "place", "rows_of"]


@dataclass(frozen=True)
class Piece:
    name: str
    start: int
    """First row (of dimension 0) held."""
    end: int
    """One past the last row held."""


@dataclass(frozen=True)
class ShardMap:
    shards: tuple[tuple[Piece, ...], ...]
    """Per shard index, the pieces it holds (in the run's tensor order)."""

    @property
    def count(self) -> int:
        return len(self.shards)

    def bytes_held(self, params: tuple[ParamSpec, ...]) -> list[int]:
        by_name = {p.name: p for p in params}
        return [sum(4 * (pc.end - pc.start) * _row_size(by_name[pc.name]) for pc in pieces) for pieces in self.shards]


@dataclass(frozen=True)
class Placement:
    """A run's shard on one server: the run's shard map and this server's index in it."""

    shard_map: ShardMap
    index: int

    def held(self, params: tuple[ParamSpec, ...]) -> tuple[ParamSpec, ...]:
        """The tensors this shard holds (``piece_specs``)."""
        return piece_specs(params, self.shard_map.shards[self.index])


def rows_of(p: ParamSpec) -> int:
    return p.shape[0] if p.shape else 1


def _row_size(p: ParamSpec) -> int:
    return math.prod(p.shape[1:]) if p.shape else 1


def place(params: tuple[ParamSpec, ...], shards: int, split_bytes: int) -> ShardMap:
    """The shard map of ``params`` over ``shards`` servers (the module's rule)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    held: list[list[Piece]] = [[] for _ in range(shards)]
    load = [0] * shards
    whole = []
    for p in params:
        rows = rows_of(p)
        if shards > 1 and (4 * p.size > split_bytes or p.table) and rows >= 2:
            n = min(shards, rows)
            base, extra = divmod(rows, n)
            start = 0
            for j in range(n):
                end = start + base + (j < extra)
                held[j].append(Piece(p.name, start, end))
                load[j] += 4 * (end - start) * _row_size(p)
                start = end
        else:
            whole.append(p)
    for p in sorted(whole, key=lambda q: (-q.size, q.name)):
        j = min(range(shards), key=lambda k: (load[k], k))
        held[j].append(Piece(p.name, 0, rows_of(p)))
        load[j] += 4 * p.size
    order = {p.name: i for i, p in enumerate(params)}
    return ShardMap(tuple(tuple(sorted(h, key=lambda pc: order[pc.name])) for h in held))


def check_map(shard_map: ShardMap, params: tuple[ParamSpec, ...]) -> None:
    """ValueError unless every row of every tensor is on exactly one shard, each tensor at most
    once per shard (a map from another server is checked before it is used)."""
    rows = {p.name: rows_of(p) for p in params}
    covered: dict[str, list[tuple[int, int]]] = {name: [] for name in rows}
    for i, pieces in enumerate(shard_map.shards):
        names = [pc.name for pc in pieces]
        if len(set(names)) != len(names) or not set(names) <= rows.keys():
            raise ValueError(f"shard {i} holds unknown or repeated tensors: {sorted(names)}")
        for pc in pieces:
            covered[pc.name].append((pc.start, pc.end))
    for name, ranges in covered.items():
        ranges.sort()
        if not ranges or ranges[0][0] != 0 or ranges[-1][1] != rows[name] or \
                any(a[1] != b[0] or a[0] >= a[1] for a, b in zip(ranges, [*ranges[1:], (rows[name], 0)], strict=True)):
            raise ValueError(f"the shards' rows of {name!r} are {ranges}, not its {rows[name]} rows once each")


def piece_specs(params: tuple[ParamSpec, ...], pieces: tuple[Piece, ...]) -> tuple[ParamSpec, ...]:
    """The tensors a shard holds: each piece as a ParamSpec of its rows, drawing its initial values
    from its whole tensor's stream (``stream``: the tensor's index in the run; ``skip``: the
    elements of the rows before it)."""
    index = {p.name: i for i, p in enumerate(params)}
    out = []
    for pc in pieces:
        p = params[index[pc.name]]
        shape = (pc.end - pc.start, *p.shape[1:]) if p.shape else ()
        out.append(replace(p, shape=shape, stream=index[pc.name], skip=pc.start * _row_size(p)))
    return tuple(out)
