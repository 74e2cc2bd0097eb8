"""The data plane, transport-neutral: PushGradient and PullParams streams as requests in (serialized
bytes) and responses out (``wire`` parts), whatever carries them.

gRPC (``servicer``) and the TCP data plane (``tcp_plane``) are two thin leaves over this: each
hands over its wire's requests as an async iterator, writes the parts yielded here, and ends the
stream with the status of a ``PsError`` raised here (``codec.error_status``). SSP questions are the
run's (``Run.wait_pull``): nothing here holds a condition or checks a clock.

A push is one or more requests with the same key, the last with ``final``. A push of several
messages is received holding a push slot (``slots``: each is held whole until applied); a bad push
is answered once its last request is in (failing while the client still writes makes gRPC report
INTERNAL instead of the real status), and until then the rest of it is read and dropped, bounded.
A pull's answer is encoded lazily, between sends: a model of hundreds of MB is never copied whole,
so a multi-message answer may include updates applied while it streams ("maybe newer ones too").

Operations in progress (a push being received or answered, a pull being served) are counted:
shutdown waits for them (``drain``), not for idle long-lived streams.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TypeVar, cast

import numpy as np
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError

from paramserver.v1 import compress, unwire, wire
from paramserver.v1 import paramserver_pb2 as pb

from .codec import WIRE_DTYPE_PB, TensorAssembler, run_state_to_proto
from .core.errors import InvalidArgument, Malformed, PsError, quoted
from .core.gate import Gate
from .core.registry import RunRegistry
from .core.run import Run
from .core.status import ParamsRead
from .core.tensors import Gradient, owned
from .slots import PushSlots, SlotHolder

__all__ = ["Caller", "DataPlane", "DataPlaneStatistics", "Later", "PushMemo", "Shared"]

log = logging.getLogger("ps_server")
R = TypeVar("R")


@dataclass(frozen=True)
class Caller:
    """What a transport knows of a stream's caller."""

    transport: str
    """"grpc" or "tcp": shown as the rank's data plane in its status."""
    time_remaining: Callable[[], float | None] = lambda: None
    """Seconds left before the call's deadline, None when the transport has none."""
    borrowed: bool = False
    """A request's bytes are the client's, valid only until the stream's next response (the
    shared-memory plane): what is kept longer (a BSP clock's held gradients) is copied before
    then (``DataPlane._apply``)."""
    chunk_bytes: int = 0
    """Payload bytes per response message on this transport; 0: the server's ``--chunk-bytes``."""
    share_bytes: int = 0
    """From this size (0: never) the transport may write a ``Shared`` response once for all its
    readers (the shared-memory plane's publications): BSP's answers of a whole model this large
    then come as the acknowledgement alone and then the parameters, which are the same bytes for
    every rank of a clock."""


@dataclass(frozen=True)
class DataPlaneStatistics:
    in_progress: int
    """Pushes and pulls being received or answered now."""
    push_slot_lends: int
    """Times a push stalled mid-stream and lent its receive slot to another (``slots``)."""


@dataclass
class _Push:
    """A whole push, received and assembled, not yet given to its run."""

    run: Run
    request: unwire.PushRequest
    """Its last request (the key, ``loss``)."""
    grads: dict[str, Gradient]
    nbytes: int
    then_pull: pb.PullParamsRequest | None
    param_version: int | None
    """Of its first request: the version its gradient was computed on (staleness-aware rate)."""
    flat: np.ndarray | None = None
    """The run's gradient buffer, when ``grads`` are its views (``DataPlane._laid_out``)."""


class PushMemo:
    """What a push stream's lean path remembers of its pushes: their layout (``unwire.PushLayout``)
    and run, learned from a push that the run applied (so its tensors are the run's, whole, in
    their shapes); a later push that matches them needs none of those checks again."""

    def __init__(self) -> None:
        self.layout: unwire.PushLayout | None = None
        self.run: Run | None = None
        self.nbytes = 0

    def learn(self, raw: bytes | memoryview, push: _Push) -> None:
        """The layout of ``push`` (decoded as usual from ``raw``, applied: not a duplicate, which
        is not checked), when it has one."""
        if push.run.spec.staleness == 0 or push.run.store.flat_gradient() is None:
            return
        layout = unwire.PushLayout.learn(raw, push.request)
        if layout is not None:
            self.layout, self.run, self.nbytes = layout, push.run, push.nbytes


_Ack = tuple[int, bool, int, int, int | None, float | None]
"""A push's acknowledgement: ``wire.push_response_parts``'s clock, duplicate, min_clock, run_state,
staleness, lr_scale."""


class Later:
    """A push applied whose then_pull must wait (``DataPlane.push_now``): iterate it for the responses."""

    def __init__(self, dataplane: DataPlane, ack: _Ack, then_pull: pb.PullParamsRequest, caller: Caller,
                 keep: Callable[[], None]) -> None:
        self._args = dataplane, ack, then_pull, caller, keep

    async def __aiter__(self) -> AsyncIterator[list[wire.Part]]:
        dataplane, ack, then_pull, caller, keep = self._args
        dataplane._begin()
        try:
            read = await dataplane._pull_keeping(then_pull, caller, keep)
            for parts in dataplane._answer(ack, read, caller):
                yield parts
        finally:
            dataplane._end()


class Shared(list[wire.Part]):
    """A response that every reader of the same ``key`` gets byte for byte: a transport may write
    its bytes once for all of them (the shared-memory plane's publications). BSP's parameters of
    one clock are (after each rank's acknowledgement). The key is ``source`` (what the data views
    are of) and every byte but the data views' (which change only with the version those bytes
    carry)."""

    def __init__(self, parts: list[wire.Part], source: object) -> None:
        super().__init__(parts)
        self._source = source

    @cached_property
    def key(self) -> tuple[object, ...]:
        return (self._source, *(bytes(p) for p in self if not isinstance(p, memoryview)))


def _nothing() -> None:
    pass


def _key(key: tuple[str, int, int, int]) -> str:
    run_id, rank, incarnation, clock = key
    return f"(run {quoted(run_id)}, rank {rank}, incarnation {incarnation}, clock {clock})"


def _rows(asked: Iterable[pb.TableRows]) -> dict[str, np.ndarray] | None:
    """A pull's ``rows``: table name -> row ids (views of the request). InvalidArgument for ids that
    are not whole int64s or a table named twice."""
    out: dict[str, np.ndarray] = {}
    for t in asked:
        if len(t.row_ids) & 7:
            raise InvalidArgument(f"rows of {quoted(t.name)}: row_ids of {len(t.row_ids)} bytes are not whole int64s "
                                  "(8 bytes each, little-endian)")
        if t.name in out:
            raise InvalidArgument(f"table {quoted(t.name)} appears twice in rows: ask for all its rows at once")
        out[t.name] = np.frombuffer(t.row_ids, wire.I64)
    return out or None


def _assembler(run: Run) -> TensorAssembler:
    """The assembler of a push to ``run``: at most twice its gradient's bytes, in its wire type."""
    return TensorAssembler(max_bytes=2 * run.store.nbytes + (1 << 20), dtype=WIRE_DTYPE_PB[run.spec.wire_dtype],
                           sparse=run.spec.topk_ratio > 0)


def _decode(parse: Callable[[bytes | memoryview], R], raw: bytes | memoryview) -> R:
    try:
        return parse(raw)
    except DecodeError as exc:
        raise Malformed(f"the request does not parse ({exc}): send a serialized paramserver.v1 message") from None


class DataPlane:
    def __init__(self, registry: RunRegistry, *, max_wait: float, chunk_bytes: int, max_message_bytes: int,
                 push_slots: int) -> None:
        self._registry = registry
        self._max_wait = max_wait
        self._chunk_bytes = chunk_bytes
        self._max_message_bytes = max_message_bytes
        self._slots = PushSlots(push_slots)
        self._busy = 0
        self._idle = Gate()

    def statistics(self) -> DataPlaneStatistics:
        return DataPlaneStatistics(self._busy, self._slots.lent)

    def _begin(self) -> None:
        self._busy += 1

    def _end(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.notify()

    async def drain(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for the operations in progress; True if none is left."""
        return await self._idle.wait_for(lambda: self._busy == 0, grace)

    # ------------------------------------------------------------------------------ push
    def slot_holder(self) -> SlotHolder:
        """A stream's use of the push slots, for a transport that receives large messages under a
        slot itself (the TCP data plane); then given to ``push_stream``."""
        return self._slots.holder()

    async def push_stream(self, requests: AsyncIterator[bytes | memoryview], caller: Caller,
                          holder: SlotHolder | None = None) -> AsyncGenerator[list[wire.Part], None]:
        """Serialized ``PushGradientRequest``s in, ``PushGradientResponse``s out."""
        holder = holder or self._slots.holder()
        try:
            while True:
                try:
                    raw = await holder.next(requests)
                except StopAsyncIteration:
                    return
                self._begin()
                try:
                    push = await self._receive(raw, requests, holder)
                    ack, then_pull, keep = self._apply(push, caller)
                    # Drop the push's messages now (its gradient and requests hold views of them), not
                    # when the next push on this stream replaces them: idle streams would hold them.
                    del push, raw
                    if then_pull is None:
                        yield wire.push_response_parts(*ack[:4], staleness=ack[4], lr_scale=ack[5])
                        continue
                    read = await self._pull_keeping(then_pull, caller, keep)  # one round trip per iteration
                    for parts in self._answer(ack, read, caller):
                        yield parts
                finally:
                    self._end()
        finally:
            holder.release()

    def push_now(self, raw: bytes | memoryview, caller: Caller,
                 memo: PushMemo | None = None) -> list[list[wire.Part]] | Later | None:
        """The lean path of a push of one message (``final`` set, as every small model's is):
        received, applied and, when its then_pull may be served at once, answered, all now, with
        no await (a transport calls it from its socket's callback: no task switch per message).
        Returns the responses; or, when the then_pull must wait, ``Later``: the caller awaits it
        and sends what it yields; or None when ``raw`` is not such a push (nothing was done:
        ``push_stream`` takes it as always). A rejected push raises PsError as in push_stream.

        ``memo``: the stream's; a push laid out as the stream's last one (``unwire.PushLayout``: the
        same tensors, encoded the same way) is read without decoding its chunks, its tensors
        copied straight into the run's gradient buffer."""
        push = self._laid_out(raw, memo) if memo is not None and memo.layout is not None else None
        decoded = push is None
        if push is None:
            try:
                req = unwire.decode_push_request(raw)
            except DecodeError:
                return None  # (push_stream says what is wrong with it)
            if not req.final:
                return None
            run, assembler = self._first(req)
            push = _Push(run, req, assembler.finish(), assembler.nbytes, req.then_pull, req.param_version)
        ack, then_pull, keep = self._apply(push, caller)
        if decoded and memo is not None and not ack[1]:
            memo.learn(raw, push)
        del push, raw
        if then_pull is None:
            return [wire.push_response_parts(*ack[:4], staleness=ack[4], lr_scale=ack[5])]
        try:
            read = self._pull_now(then_pull)
        except BaseException:
            keep()
            raise
        if read is None:
            return Later(self, ack, then_pull, caller, keep)
        keep()
        return list(self._answer(ack, read, caller))

    def _laid_out(self, raw: bytes | memoryview, memo: PushMemo) -> _Push | None:
        """The push in ``raw`` if it is laid out as ``memo`` learned, its gradient in the run's buffer."""
        assert memo.layout is not None and memo.run is not None
        got = memo.layout.match(raw if isinstance(raw, memoryview) else memoryview(raw))
        if got is None:
            return None
        req, starts = got
        run = memo.run
        if not req.final or self._registry.find(req.run_id) is not run or run.spec.staleness == 0:
            return None
        buffer = run.store.flat_gradient()
        if buffer is None:
            return None
        flat, views = buffer
        for name, start, size in zip(memo.layout.names, starts, memo.layout.sizes, strict=True):
            views[name].reshape(-1)[:] = np.frombuffer(raw, wire.F32, size >> 2, start)
        return _Push(run, req, cast("dict[str, Gradient]", views), memo.nbytes, req.then_pull, req.param_version, flat)

    def _apply(self, push: _Push, caller: Caller) -> tuple[_Ack, pb.PullParamsRequest | None, Callable[[], None]]:
        """Give a received push to its run: its acknowledgement (the response's fields), its
        then_pull, and what to call before any response to it but its acknowledgement alone.

        A BSP run holds a gradient until its clock is complete. Borrowed bytes (``Caller``) are
        held as they are when the push has a then_pull: its answer waits for that clock (which
        combines them), and only a failure answers first: then they are copied (``Run.keep_held``).
        Without a then_pull the acknowledgement goes at once: copied now."""
        req = push.request
        grads, borrowed = push.grads, caller.borrowed and push.run.spec.staleness == 0
        if borrowed and push.then_pull is None:
            grads, borrowed = owned(grads), False
        try:
            result = push.run.push(req.rank, req.incarnation, req.clock, grads, push.nbytes,
                                   req.loss, caller.transport, push.param_version, push.flat, borrowed)
        except PsError as exc:
            log.info("push rejected: %s", exc, extra={"run": req.run_id, "rank": req.rank, "clock": req.clock})
            raise
        keep = partial(push.run.keep_held, req.rank) if borrowed else _nothing
        return (result.clock, result.duplicate, result.min_clock, run_state_to_proto(result.run_state),
                result.staleness, result.lr_scale), push.then_pull, keep

    def _answer(self, ack: _Ack, read: ParamsRead, caller: Caller) -> Iterator[list[wire.Part]]:
        """A push's responses that carry its then_pull's ``read`` (the bound as the read tells it).
        Under BSP, on a transport that shares (``Caller.share_bytes``), a large model's come after the
        acknowledgement (its own response: its min clock is the rank's), ``Shared``: the data are
        views of the run's parameters."""
        source = self._shared_source(read, caller)
        if source is not None:
            yield wire.push_response_parts(*ack[:4], staleness=read.staleness, lr_scale=ack[5])
            for pulled in self._params_parts(read, caller):
                yield Shared(wire.push_response_parts(pulled=pulled), source)
            return
        for i, pulled in enumerate(self._params_parts(read, caller)):
            yield wire.push_response_parts(*ack[:4], pulled=pulled, staleness=read.staleness, lr_scale=ack[5]) \
                if i == 0 else wire.push_response_parts(pulled=pulled)

    @staticmethod
    def _shared_source(read: ParamsRead, caller: Caller) -> object | None:
        """What ``read``'s data are views of (the run's store, as a token: an id could be reused)
        when its answers are ``Shared``: a BSP read of a whole model of ``caller.share_bytes`` or
        more, in float32; else None."""
        derived = read.derived
        if not caller.share_bytes or read.staleness != 0 or derived is None or read.delta is not None or \
                read.wire_dtype != "float32" or read.rows:
            return None
        if "nbytes" not in derived:
            derived["nbytes"] = sum(t.nbytes for t in read.tensors.values())
        return derived.setdefault("shared", object()) if derived["nbytes"] >= caller.share_bytes else None

    async def _receive(self, raw: bytes | memoryview, requests: AsyncIterator[bytes | memoryview],
                       holder: SlotHolder) -> _Push:
        """The push whose first request is ``raw``, read to its final request and assembled; or
        its error, raised once its final request is in."""
        req = _decode(unwire.decode_push_request, raw)
        key = (req.run_id, req.rank, req.incarnation, req.clock)
        then_pull, param_version = req.then_pull, req.param_version
        failed: PsError | None = None
        run: Run | None = None
        assembler: TensorAssembler | None = None
        try:
            run = self._registry.get(req.run_id)
            assembler = _assembler(run)
            assembler.add(req.tensors)
        except PsError as exc:
            failed = exc
        drained, limit = 0, max(assembler.max_bytes if assembler else 0, 2 * self._max_message_bytes)
        holder.within = True
        try:
            while not req.final:
                if failed is None:
                    await holder.acquire()
                else:
                    holder.release()  # only draining now
                try:
                    raw = await holder.next(requests)
                except StopAsyncIteration:
                    failed = failed or InvalidArgument(f"the stream ended inside push {_key(key)} (final never set)")
                    break
                req = _decode(unwire.decode_push_request, raw)
                if failed is not None:
                    drained += len(raw)
                    if drained > limit:
                        break
                    continue
                this = (req.run_id, req.rank, req.incarnation, req.clock)
                try:
                    if this != key:
                        raise InvalidArgument(f"push {_key(key)} was not finished (final unset) when a request for "
                                              f"{_key(this)} arrived")
                    assert assembler is not None
                    assembler.add(req.tensors)
                except PsError as exc:
                    failed = exc
            if failed is None:
                assert run is not None and assembler is not None
                return _Push(run, req, assembler.finish(), assembler.nbytes, then_pull, param_version)
        except PsError as exc:
            failed = exc
        except BaseException:  # cancelled (its client closed the stream): as below
            failed = None
            raise
        finally:
            holder.release()
            holder.within = False
        if run is not None:
            run.counters.pushes_rejected += 1
        log.info("push rejected: %s", failed, extra={"run": key[0], "rank": key[1], "clock": key[3]})
        try:
            raise failed
        finally:  # the error's traceback holds this frame (or its callee's, which holds this one), and this frame
            del failed  # the requests (a client's segment): kept here too, a cycle, they stayed until a collection

    def _first(self, req: unwire.PushRequest) -> tuple[Run, TensorAssembler]:
        """A one-message push's run and its chunks, assembled; PsError (counted and logged as a
        rejection) when either is wrong."""
        run: Run | None = None
        try:
            run = self._registry.get(req.run_id)
            assembler = _assembler(run)
            assembler.add(req.tensors)
        except PsError as exc:
            if run is not None:
                run.counters.pushes_rejected += 1
            log.info("push rejected: %s", exc, extra={"run": req.run_id, "rank": req.rank, "clock": req.clock})
            raise
        return run, assembler

    # ------------------------------------------------------------------------------ pull
    async def pull_stream(self, requests: AsyncIterator[bytes | memoryview],
                          caller: Caller) -> AsyncGenerator[list[wire.Part], None]:
        """Serialized ``PullParamsRequest``s in, ``PullParamsResponse``s out."""
        async for raw in requests:
            req = _decode(pb.PullParamsRequest.FromString, raw)
            self._begin()
            try:
                read = await self.pull(req, caller)
                for parts in self._params_parts(read, caller):
                    yield wire.params_response_parts(*parts)
            finally:
                self._end()

    async def pull(self, req: pb.PullParamsRequest, caller: Caller) -> ParamsRead:
        """Wait as the SSP rule says, then read (an observer's read, incarnation 0, never waits)."""
        run, names, rows = self._registry.get(req.run_id), list(req.names) or None, _rows(req.rows)
        if req.incarnation and not run.pull_now(req.rank, req.incarnation, req.clock, names, rows):
            await run.wait_pull(req.rank, req.incarnation, req.clock, self._wait_limit(req.max_wait, caller),
                                names, rows)
        return self._read(run, req, names, rows)

    async def _pull_keeping(self, req: pb.PullParamsRequest, caller: Caller, keep: Callable[[], None]) -> ParamsRead:
        """A push's then_pull (``pull``), and ``keep`` (``_apply``) once it is over, however it ended."""
        try:
            return await self.pull(req, caller)
        finally:
            keep()

    def _pull_now(self, req: pb.PullParamsRequest) -> ParamsRead | None:
        """The read, when the pull may be served at once; None when it must wait (PsError when it never may)."""
        run, names, rows = self._registry.get(req.run_id), list(req.names) or None, _rows(req.rows)
        if req.incarnation and not run.pull_now(req.rank, req.incarnation, req.clock, names, rows):
            return None
        return self._read(run, req, names, rows)

    @staticmethod
    def _read(run: Run, req: pb.PullParamsRequest, names: list[str] | None,
              rows: dict[str, np.ndarray] | None) -> ParamsRead:
        if req.incarnation == 0:
            return run.read(None, req.clock, names, rows)
        since = (req.since_lineage, req.since_version) if req.since_lineage else None
        return run.read(req.rank, req.clock, names, rows, since)

    def _wait_limit(self, max_wait: Duration, caller: Caller) -> float:
        """How long a pull may park: the request's wish, capped by the server's limit and the call's deadline."""
        requested = max_wait.seconds + max_wait.nanos * 1e-9
        limit = self._max_wait if requested <= 0 else min(requested, self._max_wait)
        remaining = caller.time_remaining()
        return limit if remaining is None else max(0.0, min(limit, remaining))

    @staticmethod
    def _coded_groups(read: ParamsRead, chunk: int) -> list[wire.Group]:
        """A compressed run's read in its wire type: converted once per version of the whole model
        (every reader of that version shares it; new arrays each time, so an answer still being
        sent keeps its own)."""
        key = ("coded", chunk)
        cached = read.derived.get(key) if read.derived is not None else None
        if cached is not None and cached[0] == read.version:
            return cached[1]  # type: ignore[no-any-return]
        dtype = WIRE_DTYPE_PB[read.wire_dtype]
        coded = {name: wire.CodedPart(compress.encode(t, dtype), dtype, t.shape) for name, t in read.tensors.items()}
        groups: list[wire.Group] = list(wire.chunk_groups(coded, chunk))
        if read.derived is not None:
            read.derived[key] = (read.version, groups)
        return groups

    @staticmethod
    def _delta_groups(read: ParamsRead, chunk: int) -> list[wire.Group]:
        """A delta pull's answer: the changed elements of each tensor that has any, as sparse chunks."""
        assert read.delta is not None
        dtype = WIRE_DTYPE_PB[read.wire_dtype]
        sparse = {name: wire.CodedPart(compress.encode(read.tensors[name].reshape(-1)[picked], dtype), dtype,
                                       read.tensors[name].shape, picked) for name, picked in read.delta.items()}
        return list(wire.chunk_groups(sparse, chunk))

    def _params_parts(self, read: ParamsRead, caller: Caller) -> Iterator[wire.ParamsParts]:
        """A read as the arguments of ``wire.params_response_parts``, in groups of ~chunk_bytes.
        For the whole model the groups are built once per run and reused: the same views of the
        live parameters every time (a small model's pull then makes no numpy call before its
        encoding's one copy)."""
        chunk = caller.chunk_bytes or self._chunk_bytes
        groups: list[wire.Group | wire.EncodedGroup]
        key = ("groups", chunk)
        if read.delta is not None:
            groups = [*self._delta_groups(read, chunk)]
        elif read.wire_dtype != "float32":
            groups = [*self._coded_groups(read, chunk)]
        elif read.derived is not None and key in read.derived:
            groups = read.derived[key]
        else:
            groups = [[(name, shape, offset, part.data) for name, shape, offset, part in group]
                      for group in wire.chunk_groups(read.tensors, chunk)]
            if read.derived is not None:  # the whole model: encoded once (its data are views)
                groups = [wire.EncodedGroup(g) for g in groups]  # type: ignore[arg-type]
                read.derived[key] = groups
        if read.rows:
            rows = {name: wire.RowsPart(*picked) for name, picked in read.rows.items()}
            groups = [*([g for g in groups if g] if read.tensors else []), *wire.chunk_groups(rows, chunk)]
        state = run_state_to_proto(read.run_state)
        delta = read.delta is not None
        for i, group in enumerate(groups):
            yield (read.guaranteed_clock, read.version, group, i == len(groups) - 1, state, delta, read.lineage,
                   read.staleness)
