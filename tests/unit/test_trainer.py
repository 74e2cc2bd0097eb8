"""The worker's training loop against the in-memory server (``ps_server.testing``): real SSP,
exactly-once and errors, in one event loop, without processes or sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pytest
from support import train_all, train_with_a_zero_pusher, until

from client.spec import LaunchOptions, build_run_spec
from paramserver import errors
from paramserver.client import PsClient, PullResult
from paramserver.shards import ShardFactors, Shards
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import wire
from ps_server.core import snapshot
from ps_server.testing import InMemoryServer
from worker import main as worker_main
from worker import trainer as trainer_module
from worker.compression import PushCodec
from worker.config import WorkerConfig
from worker.main import CAPABILITIES, ending
from worker.overlap import Overlap
from worker.straggler import Straggler
from worker.trainer import Outcome, train

pytestmark = pytest.mark.timeout(120)

CONFIG = WorkerConfig(timeout_seconds=5.0, report_seconds=0.05)


def _spec(staleness: int, workers: int = 2, iterations: int = 40, **kw: object) -> pb.RunSpec:
    return build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=workers, staleness=staleness,
                                        iterations=iterations, batch_size=16, lr=0.2, **kw))  # type: ignore[arg-type]


async def _train_all(server: InMemoryServer, spec: pb.RunSpec, config: WorkerConfig = CONFIG) -> tuple[str, list[Outcome]]:
    return await train_all(server, spec, config)


@pytest.mark.parametrize(("staleness", "skips", "compress"), [(0, False, "none"), (2, True, "none"),
                                                              (-1, False, "none"), (0, False, "topk:0.1,fp16"),
                                                              (2, True, "topk:0.1,bf16"), (-1, False, "fp16")])
async def test_ranks_train_a_run_to_completion(staleness: int, skips: bool, compress: str) -> None:
    """Every rank completes; the server applied each push once; the SSP cache skips pulls only for
    a finite s > 0 (never for BSP, which always needs the combined step, nor for ASP). The same
    with compression (top-k with delta pulls, half precision)."""
    async with InMemoryServer() as server:
        run_id, outcomes = await _train_all(server, _spec(staleness, compress=compress))
        run = server.registry.get(run_id)
    assert all(o.completed for o in outcomes), outcomes
    assert run.state.value == "completed"
    c = run.status().counters
    assert c.pushes_applied == 2 * 40 and c.pushes_duplicate == 0 and c.pushes_rejected == 0
    assert (c.pulls_skipped > 0) is skips
    assert sum(o.stats.iterations for o in outcomes) == 80
    final = outcomes[0].stats.final_accuracy  # rank 0 evaluates the final parameters
    assert final is not None and final > 0.6
    assert run.history.last_eval is not None and run.history.last_eval.clock == 40


OVERLAP = dataclasses.replace(CONFIG, overlap=True)


def _record_gradients(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """(rank, clock, the rank's clock on the server) of each gradient computed, in order."""
    seen: list[tuple[int, int, int]] = []
    gradient = trainer_module._Trainer.gradient

    def recorded(self: trainer_module._Trainer, params: dict[str, np.ndarray], c: int,
                 out: dict[str, np.ndarray] | None = None) -> object:
        seen.append((self.a.rank, c, self.clock))
        return gradient(self, params, c, out)

    monkeypatch.setattr(trainer_module._Trainer, "gradient", recorded)
    return seen


@pytest.mark.parametrize(("staleness", "min_ahead"), [(1, 0), (3, 1), (-1, 39)])
async def test_overlap_computes_the_next_gradient_while_the_push_is_in_flight(
        monkeypatch: pytest.MonkeyPatch, staleness: int, min_ahead: int) -> None:
    """--overlap: the gradient of c + 1 is computed before the push of c is answered (the worker's
    clock is still c), each gradient once, each push applied once, and the run learns as without.
    Unbounded: every gradient but the first. With a finite s only while the parameters held are
    recent enough for c + 1, which is exactly when the cache would not need a pull at c + 1 (how
    often depends on the ranks' interleaving: at least the first, pulled at min clock 0, for s >= 2)."""
    seen = _record_gradients(monkeypatch)
    async with InMemoryServer() as server:
        run_id, outcomes = await _train_all(server, _spec(staleness, workers=2), OVERLAP)
        core = server.registry.get(run_id)
    assert all(o.completed for o in outcomes), outcomes
    assert core.counters.pushes_applied == 80 and core.counters.pushes_duplicate == 0
    for rank in (0, 1):
        clocks = [(c, at) for r, c, at in seen if r == rank]
        assert [c for c, _ in clocks] == list(range(40))  # every gradient once, in order
        ahead = sum(at == c - 1 for c, at in clocks)
        assert ahead >= min_ahead, (rank, ahead, clocks)  # computed while the previous push was in flight
    final = outcomes[0].stats.final_accuracy
    assert final is not None and final > 0.6


async def test_overlap_never_computes_on_parameters_the_bound_does_not_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    """s = 1 and rank 1 has not pushed (min clock 0): rank 0 may train clocks 0 and 1 only. Its
    push of 1 waits (with the pull for clock 2, parked); computing clock 2's gradient meanwhile on
    the parameters it holds (which contain no update of rank 1) would break the bound."""
    seen = _record_gradients(monkeypatch)
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=2, iterations=10))
        clients = [server.client() for _ in range(2)]
        joined = [await c.join(f"w{i}", run.run_id, max_wait=0) for i, c in enumerate(clients)]
        first = asyncio.create_task(train(clients[0], joined[0].assignment, OVERLAP))
        core = server.registry.get(run.run_id)
        while core.counters.pushes_applied < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # rank 0 is parked now: what did it compute meanwhile?
        assert [(r, c) for r, c, _ in seen] == [(0, 0), (0, 1)]
        second = asyncio.create_task(train(clients[1], joined[1].assignment, OVERLAP))
        outcomes = await asyncio.wait_for(asyncio.gather(first, second), 60)
        for c in clients:
            await c.close()
    assert all(o.completed for o in outcomes), outcomes
    assert core.counters.pushes_applied == 20 and core.counters.pushes_duplicate == 0


def _codec_resets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times each PushCodec made (in order) dropped its residual."""
    resets: list[int] = []
    init, reset = PushCodec.__init__, PushCodec.reset

    def counted_init(self: PushCodec, *args: object) -> None:
        init(self, *args)  # type: ignore[arg-type]
        self.index = len(resets)  # type: ignore[attr-defined]
        resets.append(0)

    def counted_reset(self: PushCodec) -> None:
        resets[self.index] += 1  # type: ignore[attr-defined]
        reset(self)

    monkeypatch.setattr(PushCodec, "__init__", counted_init)
    monkeypatch.setattr(PushCodec, "reset", counted_reset)
    return resets


@pytest.mark.parametrize("compress", ["none", "topk:0.05"])
async def test_transient_failures_are_retried_and_applied_once(compress: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that break before a push or pull reach the server are retried; retries of a push
    the server already applied are acknowledged as duplicates, never applied twice. Compressed:
    the worker's residual (error feedback) lives through the retries: one codec, never reset."""
    resets = _codec_resets(monkeypatch)
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=1, iterations=20, compress=compress))
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        transport = server.transports[-1]
        broken = errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        transport.fail("PushGradient", broken, times=2)  # lost on the way: nothing applied
        transport.fail("PushGradient", broken, after=True, times=2)  # applied, the answer lost
        transport.fail("PullParams", broken, after=True)
        outcome = await train(client, joined.assignment, CONFIG)
        await client.close()
        core = server.registry.get(run.run_id)
    assert outcome.completed and outcome.stats.retries == 5
    assert core.counters.pushes_applied == 20 and core.counters.updates_applied == 20
    assert core.counters.pushes_duplicate == 2  # the retries of the two pushes whose answer was lost
    assert resets == ([] if compress == "none" else [0])


async def test_a_steady_push_that_fails_goes_to_the_retry_rules_and_is_applied_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The steady state's push (``Steady``: a small model pushing with its pull every iteration,
    by ``push_pull_now``) that fails, on the way or with its answer lost, is retried by the retry
    rules as ``step``'s: each failure counted once, the push applied once, the run completed."""
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(-1, workers=1, iterations=20, eval_every=100))  # (evaluations: step)
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        transport = server.transports[-1]
        broken = errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        steady: list[int] = []
        real = PsClient.push_pull_now

        def spy(self: PsClient, run_id: str, rank: int, incarnation: int, c: int, *args: Any) -> Any:
            steady.append(c)
            if c == 5:
                transport.fail("PushGradient", broken, times=2)  # lost on the way: nothing applied
            if c == 9:
                transport.fail("PushGradient", broken, after=True, times=2)  # applied, the answer lost
            return real(self, run_id, rank, incarnation, c, *args)

        monkeypatch.setattr(PsClient, "push_pull_now", spy)
        outcome = await train(client, joined.assignment, CONFIG)
        await client.close()
        core = server.registry.get(run.run_id)
    assert steady == list(range(1, 19)), steady  # (not the first, nor the last: it pulls nothing after it)
    assert outcome.completed and outcome.stats.retries == 4
    assert core.counters.pushes_applied == 20 and core.counters.updates_applied == 20
    assert core.counters.pushes_duplicate == 2  # (the two retries of the push whose answers were lost)


async def test_a_report_whose_answer_was_lost_adds_its_points_once() -> None:
    """A ReportMetrics the server took whose answer was lost is retried with the same points: the
    run's history held each of its training points twice (two points of one clock in the loss
    curve); its evaluations were dropped already as clocks evaluated before."""
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=1, iterations=20, eval_every=5))
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        broken = errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        server.transports[-1].fail("ReportMetrics", broken, after=True, times=3)  # taken, the answer lost
        outcome = await train(client, joined.assignment, CONFIG)
        await client.close()
        points = server.registry.get(run.run_id).history.points
    assert outcome.completed and outcome.stats.retries == 3
    clocks = [p.clock for p in points if not p.eval]
    assert clocks == sorted(set(clocks)) and clocks[-1] == 20, clocks
    assert [p.clock for p in points if p.eval] == [5, 10, 15, 20]


async def test_a_join_whose_answer_was_lost_is_answered_with_the_rank_it_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Join the server took whose answer was lost (a deadline, a dropped connection) is asked
    again: the server handed the worker a second rank, and the first one had no worker until its
    lease ran out (BSP: every rank waited for it), nor did the second worker a rank until then."""
    async with InMemoryServer(lease_seconds=3.0, heartbeat_seconds=0.5) as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(0, workers=2, iterations=10))

        def connect(*_: object, **__: object) -> PsClient:
            client = server.client()
            if len(server.transports) == 2:  # (the first worker's: its first Join is served, the answer lost)
                broken = errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
                server.transports[-1].fail("Join", broken, after=True)
            return client

        monkeypatch.setattr(worker_main, "PsClient", connect)
        config = dataclasses.replace(CONFIG, once=True, join_wait_seconds=1.0)
        first = asyncio.create_task(worker_main.work(dataclasses.replace(config, name="a")))
        await until(lambda: any(s.incarnation for s in server.registry.get(run.run_id).clock.slots), 10)
        outcomes = [*await worker_main.work(dataclasses.replace(config, name="b")), *await first]
        events = server.registry.get(run.run_id).history.events
    assert sorted(o.rank for o in outcomes) == [0, 1] and all(o.completed for o in outcomes), outcomes
    assert [e.kind for e in events if e.kind in ("joined", "evicted")] == ["joined", "joined"], events


async def test_a_join_still_parked_after_its_caller_gave_up_hands_its_rank_to_the_workers_next_join(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's parked Join loses its connection (the server does not see it drop: the call stays
    parked there); the worker asks again, answered at once without work, and parks a new Join. The
    rank that falls vacant goes to the Join parked first, whose caller is gone: the worker had drawn
    a new token after the empty answer, waited on, and the rank had no worker until its lease ran
    out (BSP: every rank waited for it). The token is kept until a Join is answered with a rank."""
    async with InMemoryServer(lease_seconds=2.0, heartbeat_seconds=0.5) as server:
        admin = server.client()
        run = await admin.create_run(_spec(0, workers=1, iterations=5))
        held = (await admin.join("a", run.run_id, max_wait=0)).assignment

        async def holding() -> None:
            while True:
                await admin.heartbeat(run.run_id, held.rank, held.incarnation, 0)
                await asyncio.sleep(0.2)

        holder = asyncio.create_task(holding())
        stale: list[asyncio.Future[pb.JoinResponse]] = []

        def connect(*_: object, **__: object) -> PsClient:
            client = server.client()
            transport = server.transports[-1]
            unary = transport.unary

            async def dropped(service: str, method: str, request: Any, response: Any, timeout: float) -> Any:
                if method == "Join" and request.max_wait.ToNanoseconds() and not stale:  # (parked there, for ever)
                    stale.append(asyncio.ensure_future(server.control.Join(request)))
                    await until(lambda: server.registry._work.statistics().waiting, 10)
                    raise errors.Unavailable(errors.Code.UNAVAILABLE, "connection dropped (injected)")
                return await unary(service, method, request, response, timeout)

            monkeypatch.setattr(transport, "unary", dropped)
            return client

        monkeypatch.setattr(worker_main, "PsClient", connect)
        config = dataclasses.replace(CONFIG, once=True, join_wait_seconds=5.0)
        working = asyncio.create_task(worker_main.work(dataclasses.replace(config, name="b")))
        await until(lambda: server.registry._work.statistics().waiting == 2, 10)  # the stale Join and the new one
        holder.cancel()
        await admin.leave(run.run_id, held.rank, held.incarnation, pb.LEAVE_REASON_SHUTDOWN)
        await admin.close()
        (outcome,) = await asyncio.wait_for(working, 30)
        taken = (await stale[0]).assignment
        events = server.registry.get(run.run_id).history.events
    assert outcome.completed and outcome.rank == taken.rank, outcome
    assert [e.kind for e in events if e.kind in ("joined", "evicted")] == ["joined", "joined"], events


@pytest.mark.parametrize(("model", "optimizer", "staleness", "compress"),
                         [("softmax", "sgd", 2, "topk:0.05"), ("softmax", "sgd", -1, "topk:0.05,bf16"),
                          ("softmax", "sgd", 2, "fp16"), ("logistic:rows=4096", "adagrad", 2, "none"),
                          ("fm:4:rows=4096", "ftrl", 0, "none")])
async def test_pushes_retried_after_lost_answers_end_as_a_run_without_failures(
        model: str, optimizer: str, staleness: int, compress: str) -> None:
    """Exactly-once end to end: pushes lost on the way, pushes applied whose answer was lost, and
    pulls whose answer was lost, all retried, leave the parameters and the optimizer state (a
    table's per-row accumulators too) bit for bit as a run without failures. Compressed: each
    retry carries what the first try did, and the residual is what the push applied once left."""
    dataset = "synthetic-ctr:samples=2000" if model != "softmax" else "digits"
    spec = build_run_spec(LaunchOptions(model=model, dataset=dataset, workers=1, staleness=staleness, iterations=20,
                                        batch_size=16, lr=0.2, optimizer=optimizer, compress=compress))

    async def final(failures: bool) -> tuple[dict[str, bytes], int]:
        async with InMemoryServer() as server:
            async with server.client() as admin:
                run = await admin.create_run(spec)
            client = server.client()
            joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
            if failures:
                transport, broken = server.transports[-1], errors.Unavailable(errors.Code.UNAVAILABLE, "reset (injected)")
                transport.fail("PushGradient", broken, times=2)
                transport.fail("PushGradient", broken, after=True, times=3)
                transport.fail("PullParams", broken, after=True, times=2)
            outcome = await train(client, joined.assignment, CONFIG)
            await client.close()
            core = server.registry.get(run.run_id)
        assert outcome.completed, outcome
        state = {f"param/{n}": a.tobytes() for n, a in core.store.params.items()}
        state.update({f"opt/{k}": a.tobytes() for k, a in core.optimizer.state_arrays().items()})
        return state, core.counters.pushes_duplicate

    (clean, _), (retried, duplicates) = await final(False), await final(True)
    assert duplicates == 3 and retried == clean


async def _final_parameters(staleness: int) -> dict[str, np.ndarray]:
    """The parameters a one-worker run of 8 iterations at ``staleness`` ends with (in memory)."""
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(staleness, workers=1, iterations=8))
            client = server.client()
            joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
            outcome = await train(client, joined.assignment, CONFIG)
            await client.close()
            assert outcome.completed
            return (await admin.pull(run.run_id)).tensors


async def test_a_gradient_computed_in_the_push_stream_s_memory_is_computed_again_for_a_retry(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A gradient written into the push stream's shared memory (``PsClient.push_buffers``) is gone
    once the server answers over it: a push retried after a failure sends it computed anew. Here
    the memory is scribbled over as the first try of push 3 fails, before reaching the server: the
    run ends with the parameters of a run without failures, bit for bit."""
    given: list[dict[str, np.ndarray]] = []
    tries: list[int] = []

    def push_buffers(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                     like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given.append({n: np.empty_like(a) for n, a in like.items()})  # (the stream's segment)
        return given[-1]

    push_pull = PsClient.push_pull

    async def flaky(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                    grads: dict[str, np.ndarray], *args: object, **kw: object) -> object:
        tries.append(clock)
        if clock == 3 and tries.count(3) == 1:
            assert all(grads[n] is g for n, g in given[-1].items())  # the push sends them from where they are
            for g in given[-1].values():
                g.fill(np.nan)  # the server's answer over them
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        return await push_pull(self, run_id, rank, incarnation, clock, grads, *args, **kw)  # type: ignore[arg-type]

    plain = await _final_parameters(-1)
    monkeypatch.setattr(trainer_module, "IN_PLACE_BYTES", 0)  # (this model's tensors are small)
    monkeypatch.setattr(PsClient, "push_buffers", push_buffers)
    monkeypatch.setattr(PsClient, "push_pull", flaky)
    retried = await _final_parameters(-1)
    assert tries == [0, 1, 2, 3, 3, 4, 5, 6] and len(given) == 7  # the last push pulls nothing
    for name, value in plain.items():
        np.testing.assert_array_equal(retried[name], value)


@pytest.mark.parametrize("staleness", [0, -1])
async def test_a_retry_pulls_again_the_parameters_it_had_borrowed(staleness: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where every push pulls (BSP, unbounded staleness) a large model's answers are borrowed
    (``push_pull(borrow=True)``: read-only views of the server's publication or of the push
    stream's segment, valid until the stream's next request). A push retried after a failure must
    not compute its gradient again on them (the server may have written that memory over since:
    here it is scribbled over as the first try of push 3 fails): it pulls them again, and the run
    ends with the parameters of a run without failures, bit for bit."""
    tries: list[tuple[int, bool]] = []
    lent: dict[str, np.ndarray] = {}

    def push_buffers(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                     like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.empty_like(a) for n, a in like.items()}

    push_pull = PsClient.push_pull

    async def lending(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                      grads: dict[str, np.ndarray], *args: object, **kw: Any) -> object:
        tries.append((clock, kw.get("borrow", False)))
        into = kw["into"]
        if clock == 3 and len(tries) == 4:
            for a in lent.values():
                a.fill(np.nan)  # the server writes its publication again
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        kw.pop("borrow", None)  # (the in-memory server publishes nothing: lend copies, read only)
        answer = await push_pull(self, run_id, rank, incarnation, clock, grads, *args, **kw)
        for name, a in into.items():
            lent[name] = a.copy()
            into[name] = lent[name].view()
            into[name].flags.writeable = False
        return answer

    plain = await _final_parameters(staleness)
    released: list[int] = []
    monkeypatch.setattr(trainer_module, "release_free_memory", lambda: released.append(1) or False)  # (nothing freed)
    monkeypatch.setattr(trainer_module, "IN_PLACE_BYTES", 0)  # (this model's tensors are small)
    monkeypatch.setattr(PsClient, "push_buffers", push_buffers)
    monkeypatch.setattr(PsClient, "push_pull", lending)
    retried = await _final_parameters(staleness)
    assert tries == [(c, True) for c in (0, 1, 2, 3, 3, 4, 5, 6)]  # every push that pulls borrows
    assert released == [1]  # once computing on borrowed parameters: its own copies' memory given back
    for name, value in plain.items():
        np.testing.assert_array_equal(retried[name], value)


async def test_a_retried_borrowing_push_says_it_computed_on_the_parameters_pulled_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry of a borrowing push computes its gradient on the parameters pulled again; under
    unbounded staleness others push meanwhile, so those are a newer version, and the push must
    say so (``param_version``: a staleness-aware learning rate is scaled by it)."""
    events: list[tuple[str, int, int | None]] = []  # (what, clock, version)
    failed = False

    def push_buffers(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                     like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: np.empty_like(a) for n, a in like.items()}

    push_pull, pull = PsClient.push_pull, PsClient.pull

    async def spy_pull(self: PsClient, run_id: str, rank: int = 0, incarnation: int = 0, clock: int = 0,
                       **kw: Any) -> object:
        res = await pull(self, run_id, rank, incarnation, clock, **kw)
        if rank == 0:
            events.append(("pull", clock, res.version))
        return res

    async def lending(self: PsClient, run_id: str, rank: int, incarnation: int, clock: int,
                      grads: dict[str, np.ndarray], *args: object, **kw: Any) -> object:
        nonlocal failed
        if rank == 0:
            events.append(("push", clock, kw.get("param_version")))
        if rank == 0 and clock == 3 and not failed:
            failed = True
            await asyncio.sleep(0.3)  # (rank 1 pushes meanwhile)
            raise errors.Unavailable(errors.Code.UNAVAILABLE, "connection reset (injected)")
        kw.pop("borrow", None)  # (the in-memory server lends nothing: copies, read only)
        answer = await push_pull(self, run_id, rank, incarnation, clock, grads, *args, **kw)
        for name, a in kw["into"].items():
            kw["into"][name] = a.copy()
            kw["into"][name].flags.writeable = False
        return answer

    monkeypatch.setattr(trainer_module, "IN_PLACE_BYTES", 0)  # (this model's tensors are small)
    monkeypatch.setattr(PsClient, "push_buffers", push_buffers)
    monkeypatch.setattr(PsClient, "push_pull", lending)
    monkeypatch.setattr(PsClient, "pull", spy_pull)
    async with InMemoryServer() as server:
        _, outcomes = await _train_all(server, _spec(-1, workers=2, iterations=12, staleness_aware_lr=True))
    assert all(o.completed for o in outcomes)
    i = events.index(next(e for e in events if e[:2] == ("push", 3)))
    (_, _, first), (what, _, pulled), (again, clock, said) = events[i : i + 3]
    assert (what, again, clock) == ("pull", "push", 3)
    assert pulled is not None and first is not None and pulled > first  # rank 1 pushed in between
    assert said == pulled


@pytest.mark.parametrize(("overlap", "compress", "said"), [(False, "none", True), (True, "none", True),
                                                           (False, "topk:0.3", True), (False, "topk:0.3", False),
                                                           (True, "topk:0.3", False)])
async def test_read_my_writes_steps_at_the_rate_the_server_applied(monkeypatch: pytest.MonkeyPatch, overlap: bool,
                                                                   compress: str, said: bool) -> None:
    """With a staleness-aware rate the server divides a push's rate by its staleness: rank 0,
    s = 4, reusing its copy while rank 1 pushes (zeros), sees factors below 1. Its own step on that
    copy takes the same factor (it took the whole rate), so the copy it computes on is the
    server's parameters, to the bit (with --overlap, which steps at the whole rate while the push
    is in flight and gives the rest back once its answer says the factor, to float32 rounding). An
    answer that does not say it (``said``: a server that lost it, a shard that did not) leaves no
    copy: the next iteration pulls, whole (a delta needs the copy it is a delta of)."""
    compared: list[int] = []
    servers: list[InMemoryServer] = []

    def check(params: dict[str, np.ndarray], c: int) -> None:
        (run,) = servers[0].registry._runs.values()
        for name, value in params.items():
            np.testing.assert_allclose(value, run.store.params[name], rtol=1e-5 if overlap else 0,
                                       atol=1e-7 if overlap else 0, err_msg=f"{name} at clock {c}")
        compared.append(c)

    gradient = trainer_module._Trainer.gradient

    def checked(self: trainer_module._Trainer, params: dict[str, np.ndarray], c: int,
                out: dict[str, np.ndarray] | None = None) -> object:
        if not self.config.overlap:  # (with --overlap it computes while its push is in flight)
            check(params, c)
        return gradient(self, params, c, out)

    overlapped = Overlap.run

    async def checked_after(self: Overlap, push: Any, params: dict[str, np.ndarray],
                            grads: dict[str, np.ndarray], c: int, guaranteed: int) -> Any:
        answer = await overlapped(self, push, params, grads, c, guaranteed)
        check(params, c + 1)  # once the push's answer came: the copy its next iteration keeps
        return answer

    monkeypatch.setattr(trainer_module._Trainer, "gradient", checked)
    monkeypatch.setattr(Overlap, "run", checked_after)
    if not said:
        monkeypatch.setattr(trainer_module._Trainer, "own_factor", lambda self, resp: None)
    async with InMemoryServer() as server:
        servers.append(server)
        spec = _spec(4, workers=2, iterations=16, staleness_aware_lr=True, compress=compress)
        run_id, outcome = await train_with_a_zero_pusher(server, spec, dataclasses.replace(CONFIG, overlap=overlap))
        assert outcome.completed, outcome
        c = server.registry.get(run_id).status().counters
    if said:
        assert c.pulls_skipped > 0 and c.lr_scale_sum < c.lr_scaled  # it reused its copy, and some factors were < 1
    else:
        assert c.pulls_skipped == 0  # every iteration pulled
    assert len(compared) >= 10


@pytest.mark.parametrize(("factor", "pulled"), [(1.0, False), (0.5, False), (0.25, False), (None, False), (0.5, True)])
async def test_an_overlapped_step_leaves_the_copy_the_server_has(factor: float | None, pulled: bool) -> None:
    """--overlap, plain SGD at rate 1/4, s = 4: while the push of clock 2 is in flight the gradient
    of 3 is computed on the copy with this rank's own step of 2 at the whole rate (read-my-writes);
    once the answer says the factor the server applied (``lr_scale``), the copy kept is the
    server's, w - (lr * factor) * g (dyadic values: exact, whatever the rounding). An answer that
    does not say it leaves no copy (the next iteration pulls), and one that brought a pull leaves
    the pulled parameters as they came."""
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1, staleness=4, iterations=10,
                                        lr=0.25, staleness_aware_lr=True))
    a = pb.Assignment(run_id="r", rank=0, incarnation=1, start_clock=2, spec=spec)
    t = trainer_module._Trainer(None, a, OVERLAP)  # type: ignore[arg-type]  # (the push below is all it calls)
    w = {"w": np.array([[1.0, 2.0], [-0.5, 0.0]], np.float32), "b": np.array([3.0, -1.0], np.float32)}
    g = {"w": np.array([[1.0, -2.0], [0.5, 4.0]], np.float32), "b": np.array([-0.5, 2.0], np.float32)}
    params = {n: v.copy() for n, v in w.items()}
    t._version, t._own = 7, 1  # pulled at version 7, one own step since
    fresh = {n: np.full_like(v, 9.0) for n, v in w.items()}  # (what a pull with the push would bring)
    seen: list[tuple[dict[str, np.ndarray], int]] = []

    def gradient(params: dict[str, np.ndarray], c: int, out: object = None) -> tuple[float, dict[str, np.ndarray], int, float]:
        seen.append(({n: v.copy() for n, v in params.items()}, c))
        return 0.5, {n: np.ones_like(v) for n, v in params.items()}, 16, 0.0

    async def push() -> tuple[pb.PushGradientResponse, PullResult | None]:
        await asyncio.sleep(0)  # (the answer comes after a round trip: once the gradient is computed)
        resp = pb.PushGradientResponse(clock=3, min_clock=3, run_state=pb.RUN_STATE_RUNNING)
        if factor is not None:
            resp.lr_scale = factor
        if not pulled:
            return resp, None
        for n, v in fresh.items():
            np.copyto(params[n], v)
        return resp, PullResult(3, 9, pb.RUN_STATE_RUNNING, params)

    t.gradient = gradient  # type: ignore[method-assign]
    assert t._overlap is not None
    resp, res, _ = await t._overlap.run(push, params, g, 2, 2)
    assert resp.clock == 3 and (res is not None) is pulled
    [(computed_on, clock)] = seen
    assert clock == 3
    for n in w:  # the whole rate, ahead of the answer
        np.testing.assert_array_equal(computed_on[n], w[n] - np.float32(0.25) * g[n])
    if factor is None:
        assert params == {} and t._overlap.ahead is None and t._own == 0
        return
    for n in w:
        want = fresh[n] if pulled else w[n] - np.float32(0.25 * factor) * g[n]
        np.testing.assert_array_equal(params[n], want, err_msg=n)
    assert t._overlap.ahead is not None and t._overlap.ahead[1] == 9  # computed on the pull plus both own steps
    assert t._own == 2


class _Shard:
    """A server of a sharded run that answers each push with its own factor (``lr_scale``: its
    staleness for the rank), after a round trip."""

    def __init__(self, factor: float | None) -> None:
        self.factor = factor

    async def push(self, run_id: str, rank: int, incarnation: int, clock: int, grads: object, loss: float = 0.0,
                   timeout: float | None = None, param_version: int | None = None) -> pb.PushGradientResponse:
        await asyncio.sleep(0)
        resp = pb.PushGradientResponse(clock=clock + 1, min_clock=clock + 1, run_state=pb.RUN_STATE_RUNNING)
        if self.factor is not None:
            resp.lr_scale = self.factor
        return resp

    async def close(self) -> None:
        pass


def _sharded(factors: tuple[float | None, float | None], compress: str = "none",
             overlap: bool = False) -> trainer_module._Trainer:
    """A rank of a run whose 'w' (4 x 2) is split over two servers (rows 0-1, 2-3) and whose 'b'
    the second holds, which answer pushes with ``factors``; plain SGD at rate 1/4, s = 4."""
    spec = build_run_spec(LaunchOptions(model="softmax", dataset="digits", workers=1, staleness=4, iterations=10,
                                        lr=0.25, staleness_aware_lr=True, compress=compress))
    shard_map = pb.ShardMap(shards=[pb.Shard(index=0, pieces=[pb.Piece(name="w", row_start=0, row_end=2)]),
                                    pb.Shard(index=1, pieces=[pb.Piece(name="w", row_start=2, row_end=4),
                                                              pb.Piece(name="b", row_start=0, row_end=2)])])
    t = trainer_module._Trainer(None, pb.Assignment(run_id="r", rank=0, incarnation=1, start_clock=2, spec=spec),  # type: ignore[arg-type]
                                dataclasses.replace(CONFIG, overlap=overlap))
    servers = [_Shard(f) for f in factors]
    t.plane = Shards(shard_map, {"w": (4, 2), "b": (2,)}, lambda s: servers[s.index], staleness=4)  # type: ignore[arg-type,return-value]
    return t


_W = {"w": np.array([[1.0, 2.0], [-0.5, 0.0], [3.0, 1.5], [0.25, -1.0]], np.float32),
      "b": np.array([3.0, -1.0], np.float32)}
_G = {"w": np.array([[1.0, -2.0], [0.5, 4.0], [-1.0, 2.0], [8.0, 0.5]], np.float32),
      "b": np.array([-0.5, 2.0], np.float32)}


def _each_shards_step(sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The parameters after the push of ``sent`` at the rate each server took: rows 0-1 of 'w'
    the whole rate, rows 2-3 and 'b' half of it (dyadic values: exact)."""
    lr = np.float32(0.25)
    w = _W["w"] - np.concatenate([np.full((2, 1), lr), np.full((2, 1), lr / 2)]) * sent["w"]
    return {"w": w, "b": _W["b"] - lr / 2 * sent["b"]}


@pytest.mark.parametrize("compress", ["none", "topk:0.5"])
async def test_each_shards_rows_take_the_rate_that_server_took(compress: str) -> None:
    """Two servers answer one push with different factors (their staleness for this rank differ):
    the combined answer says no one factor, the sharded client says each server's for its rows,
    and the rank's own step on the copy it keeps takes each (the copy is the servers' parameters;
    it was dropped and pulled again). With top-k, the elements the push carried."""
    t = _sharded((1.0, 0.5), compress)
    params = {n: v.copy() for n, v in _W.items()}
    sent = t.codec.encode(_G) if t.codec else _G
    resp = await t.plane.push("r", 0, 1, 2, sent, param_version=7)
    assert not resp.HasField("lr_scale")
    factor = t.own_factor(resp)
    assert isinstance(factor, ShardFactors)
    np.testing.assert_array_equal(factor.of_rows("w", np.arange(4)), [1.0, 1.0, 0.5, 0.5])
    t._apply_own(params, _G, factor)
    carried = {n: np.zeros_like(g) for n, g in _G.items()}
    for n in carried:
        picked, values = t.codec.sent_values(n) if t.codec else (None, _G[n].reshape(-1))
        carried[n].reshape(-1)[slice(None) if picked is None else picked] = values
    want = _each_shards_step(carried)
    for n in _W:
        np.testing.assert_array_equal(params[n], want[n], err_msg=n)


async def test_an_overlapped_step_on_shards_leaves_each_rows_at_their_servers_rate() -> None:
    """--overlap over two servers: the own step taken at the whole rate before the answers is
    brought to each server's factor for its rows (exact here: dyadic values)."""
    t = _sharded((1.0, 0.5), overlap=True)
    params = {n: v.copy() for n, v in _W.items()}
    t._version, t._own = 7, 0
    t.gradient = lambda params, c, out=None: (0.5, {n: np.ones_like(v) for n, v in params.items()}, 16, 0.0)  # type: ignore[method-assign]

    async def push() -> tuple[pb.PushGradientResponse, PullResult | None]:
        return await t.plane.push("r", 0, 1, 2, _G, param_version=7), None

    assert t._overlap is not None
    resp, _, _ = await t._overlap.run(push, params, _G, 2, 2)
    want = _each_shards_step(_G)
    for n in _W:
        np.testing.assert_array_equal(params[n], want[n], err_msg=n)
    assert t._overlap.ahead is not None and t._own == 1


@pytest.mark.parametrize("factors", [(None, 0.5), (0.5, None)])
async def test_a_shard_that_does_not_say_its_factor_leaves_no_copy(factors: tuple[float | None, float | None]) -> None:
    """The copy is the servers' only if every server said the factor its rows took."""
    t = _sharded(factors)
    resp = await t.plane.push("r", 0, 1, 2, _G, param_version=7)
    assert t.own_factor(resp) is None


async def test_the_factors_said_are_those_of_the_planes_last_push() -> None:
    t = _sharded((1.0, 0.5))
    first = await t.plane.push("r", 0, 1, 2, _G, param_version=7)
    second = await t.plane.push("r", 0, 1, 3, _G, param_version=8)
    assert t.own_factor(first) is None and isinstance(t.own_factor(second), ShardFactors)


async def test_shards_that_took_one_factor_say_it_as_one() -> None:
    t = _sharded((0.5, 0.5))
    resp = await t.plane.push("r", 0, 1, 2, _G, param_version=7)
    assert resp.lr_scale == 0.5 and t.own_factor(resp) == 0.5


@pytest.mark.parametrize("overlap", [False, True])
async def test_a_worker_alone_is_never_stale_whatever_its_copy_s_age(overlap: bool) -> None:
    """Its own pushes are in the copy it keeps (read-my-writes): its pushes say so (the pull's
    version plus its own steps since), and a staleness-aware rate leaves them whole. They said the
    pull's version: its k-th push on a kept copy took 1/k of the rate, though it missed nothing."""
    async with InMemoryServer() as server:
        spec = _spec(8, workers=1, iterations=30, staleness_aware_lr=True)
        run_id, outcomes = await _train_all(server, spec, dataclasses.replace(CONFIG, overlap=overlap))
        c = server.registry.get(run_id).status().counters
    assert all(o.completed for o in outcomes), outcomes
    assert c.pulls_skipped > 10 and c.lr_scaled == 30 and c.lr_scale_sum == 30.0


async def test_a_borrowing_push_pull_asks_for_the_whole_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """``push_pull(borrow=True)`` leaves ``since`` out of its then_pull: a delta answer would need
    arrays of the worker's own to write into, and borrowed ones are read only."""
    asked: list[tuple[int, int] | None] = []
    encode = wire.pull_request_bytes

    def spy(run_id: str, rank: int, incarnation: int, clock: int, wait: float,
            since: tuple[int, int] | None = None) -> bytes:
        asked.append(since)
        return encode(run_id, rank, incarnation, clock, wait, since)

    monkeypatch.setattr(wire, "pull_request_bytes", spy)
    async with InMemoryServer() as server:
        async with server.client() as c:
            run = await c.create_run(_spec(-1, workers=1, iterations=8))
            a = (await c.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
            params: dict[str, np.ndarray] = {}
            pulled = await c.pull(run.run_id, a.rank, a.incarnation, 0, into=params)
            grads = {n: np.zeros_like(v) for n, v in params.items()}
            since = (pulled.lineage or 1, pulled.version)
            for clock, borrow in ((0, False), (1, True)):
                await c.push_pull(run.run_id, a.rank, a.incarnation, clock, grads, into=params, since=since, borrow=borrow)
    assert asked == [since, None]


@pytest.mark.parametrize("compress", ["none", "topk:0.05,fp16"])
async def test_a_server_that_lost_clocks_sends_the_worker_back(compress: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server restored from an older checkpoint knows the rank at an earlier clock: the refusal's
    reason (CLOCK_AHEAD) and fact (next_clock) send the worker back there, and the run completes.
    Compressed: the restored parameters are another lineage, so the next pull is whole, not a delta;
    the residual is dropped once (the iterations it came from are computed again)."""
    resets = _codec_resets(monkeypatch)
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(-1, workers=1, iterations=30, compress=compress))
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        core = server.registry.get(run.run_id)
        saved: dict[str, object] = {}

        def restart_at_clock_5(r: object) -> None:  # take a snapshot at clock 5, restore it at clock 15
            if core.min_clock == 5 and "meta" not in saved:
                saved["meta"], saved["arrays"] = snapshot.state_dict(core)
            elif core.min_clock == 15 and "restored" not in saved:
                restored = snapshot.restore(saved["meta"], saved["arrays"])  # type: ignore[arg-type]
                saved["restored"] = server.registry.add(restored)

        core.on_change = restart_at_clock_5
        outcome = await train(client, joined.assignment, CONFIG)
        await client.close()
        restored = server.registry.get(run.run_id)
    assert restored is saved["restored"]
    assert outcome.completed and outcome.stats.rewinds == 1
    assert restored.store.lineage != core.store.lineage
    assert resets == ([] if compress == "none" else [1])
    assert restored.state.value == "completed" and restored.clock.slots[0].clock == 30


async def test_a_worker_sent_back_reports_the_clocks_it_trains_again_not_those_the_server_lost() -> None:
    """Points recorded and not reported yet when a restarted server sends the worker back are of
    iterations the server lost: reported after the rewind, the run's history took them, and kept
    them over the clocks trained again (a rank's clock keeps its first point), a loss curve of
    parameters the run no longer has."""
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(-1, workers=1, iterations=30, eval_every=100))
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        core = server.registry.get(run.run_id)
        saved: dict[str, Any] = {}

        def restart_at_clock_5(r: object) -> None:  # take a snapshot at clock 5, restore it at clock 15
            if core.min_clock == 5 and "meta" not in saved:
                saved["meta"], saved["arrays"] = snapshot.state_dict(core)
            elif core.min_clock == 15 and "restored" not in saved:
                saved["restored"] = server.registry.add(snapshot.restore(saved["meta"], saved["arrays"]))
                saved["at"] = time.time()

        core.on_change = restart_at_clock_5
        config = dataclasses.replace(CONFIG, report_seconds=60.0)  # (reports at the end: every point pending)
        outcome = await train(client, joined.assignment, config)
        await client.close()
        restored = server.registry.get(run.run_id)
    assert restored is saved["restored"] and outcome.completed and outcome.stats.rewinds == 1
    points = [(p.clock, p.time > saved["at"]) for p in restored.history.points if not p.eval]
    print("PTS", points, outcome.stats.rewinds)
    assert points and all(again for clock, again in points if clock > 5), points
    assert [clock for clock, _ in points] == sorted({clock for clock, _ in points}) and points[-1][0] == 30, points

@pytest.mark.parametrize(("model", "compress"), [("softmax", "none"), ("softmax", "topk:0.1"),
                                               ("logistic:rows=4096", "none")])
async def test_a_worker_whose_copy_holds_updates_a_restarted_server_lost_pulls_again(
        model: str, compress: str) -> None:
    """s = 1: rank 0 at clock 5 waits for rank 1 (clock 3). The server's newest checkpoint is then;
    rank 1 pushes 3, rank 0's pull is answered (guaranteed clock 4), and the server restarts from
    that checkpoint: rank 0's clock is the same there, rank 1 is back at 3. Rank 0's push of 5,
    computed on parameters holding rank 1's lost push, is refused (it needs min clock 4): its copy
    is not the server's history. It pulls again (waiting for rank 1's push of 3 anew), computes
    clock 5 again and goes on; the run completes (the refusal ended its assignment)."""
    dataset = "synthetic-ctr:samples=2000" if model != "softmax" else "digits"
    spec = build_run_spec(LaunchOptions(model=model, dataset=dataset, workers=2, staleness=1, iterations=12,
                                        batch_size=16, lr=0.2, compress=compress))
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(spec)
        c0, c1 = server.client(), server.client()
        j0 = (await c0.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
        j1 = (await c1.join("w1", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
        core = server.registry.get(run.run_id)
        dense = [p.name for p in spec.params if not p.table]
        zero = {p.name: np.zeros(tuple(p.shape), np.float32) for p in spec.params if not p.table}
        zero = PushCodec.of(spec).encode(zero) if PushCodec.of(spec) else zero  # type: ignore[union-attr]
        rank0 = asyncio.create_task(train(c0, j0, CONFIG))
        for clock in range(3):  # (each then_pull waits for the bound: no push of rank 1 is refused)
            await c1.push_pull(run.run_id, j1.rank, j1.incarnation, clock, zero, into={}, names=dense)
        while core.clock.slots[0].waiting_for != 5:  # rank 0 pushed 0..4, its pull of 5 parked
            await asyncio.sleep(0.01)
        meta, arrays = snapshot.state_dict(core)  # the newest checkpoint
        restored: list[object] = []

        def restart(r: object) -> None:  # right after rank 1's push of 3 (its pull of 5 answered by then)
            if core.clock.slots[1].clock == 4 and not restored:
                restored.append(server.registry.add(snapshot.restore(meta, arrays)))

        core.on_change = restart
        await c1.push(run.run_id, j1.rank, j1.incarnation, 3, zero)
        assert restored
        again = server.registry.get(run.run_id)
        await until(lambda: again.counters.pushes_rejected or again.clock.slots[0].clock > 5)  # rank 0's push of 5

        async def rank1_again() -> None:  # rank 1 pushes 3 again, and on
            for clock in range(3, spec.iterations):
                await c1.push_pull(run.run_id, j1.rank, j1.incarnation, clock, zero, into={}, names=dense)
            await c1.leave(run.run_id, j1.rank, j1.incarnation, pb.LEAVE_REASON_DONE)

        rank1 = asyncio.create_task(rank1_again())
        outcome = await asyncio.wait_for(rank0, 60)
        if not outcome.completed:
            rank1.cancel()
        assert outcome.completed, outcome
        await rank1
        for c in (c0, c1):
            await c.close()
        final = server.registry.get(run.run_id)
    assert final.state.value == "completed" and final.counters.pushes_rejected == 1
    assert outcome.stats.rewinds == 1


@pytest.mark.parametrize("model", ["softmax", "logistic:rows=4096"])
async def test_a_worker_sent_back_pulls_again_before_it_computes(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sent back to clock 0 (a server restored from a checkpoint taken before any push), a worker
    with staleness 3 computes its next gradient on the restored parameters, not on the copy it held:
    that copy has updates the server lost (it skipped the pull: clock 0 needs no update, and its
    copy counted as fresh enough)."""
    from worker.models.ctr import HashedModel
    from worker.models.linear import SoftmaxRegression

    initial: list[bool] = []  # per gradient: computed on the initial parameters (all zero for both models)
    for cls in (SoftmaxRegression, HashedModel):
        def loss_and_grad(self: Any, params: Any, *args: Any, compute: Any = cls.loss_and_grad) -> Any:
            initial.append(all(not np.any(getattr(p, "values", p)) for p in params.values()))
            return compute(self, params, *args)
        monkeypatch.setattr(cls, "loss_and_grad", loss_and_grad)
    dataset = "synthetic-ctr:samples=2000" if model.startswith("logistic") else "digits"
    spec = build_run_spec(LaunchOptions(model=model, dataset=dataset, workers=1, staleness=3, iterations=12,
                                        batch_size=16, lr=0.2))
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(spec)
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)
        core = server.registry.get(run.run_id)
        meta, arrays = snapshot.state_dict(core)  # before any push
        restored: list[object] = []

        def restore_at_clock_6(r: object) -> None:
            if core.min_clock == 6 and not restored:
                restored.append(server.registry.add(snapshot.restore(meta, arrays)))

        core.on_change = restore_at_clock_6
        outcome = await train(client, joined.assignment, CONFIG)
        await client.close()
    assert outcome.completed and outcome.stats.rewinds == 1
    assert initial[0] and initial.count(True) == 2, initial  # the first iteration, and the first after the rewind


async def test_a_stopped_run_ends_the_assignment_without_failing_it() -> None:
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=2, iterations=10_000))
            clients = [server.client(), server.client()]
            joined = [await c.join(f"w{i}", run.run_id, max_wait=0) for i, c in enumerate(clients)]
            tasks = [asyncio.create_task(train(c, j.assignment, CONFIG)) for c, j in zip(clients, joined, strict=True)]
            while (await admin.get_run(run.run_id)).min_clock < 5:
                await asyncio.sleep(0.01)
            await admin.stop_run(run.run_id, "enough")
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for c in clients:
            await c.close()
    assert not any(o.completed or o.failed for o in outcomes), outcomes
    assert all(o.stats.iterations >= 5 for o in outcomes)
    # how it ended is a fact from the refusal's reason and ErrorInfo (or a heartbeat), not from its text
    assert [(o.run_state, o.evicted) for o in outcomes] == [(pb.RUN_STATE_STOPPED, False)] * 2, outcomes
    assert [ending(o) for o in outcomes] == [(logging.INFO, f"run {run.run_id} was stopped")] * 2


async def test_a_rank_with_an_empty_shard_fails_the_run_at_once_saying_how_many_workers_fit(tmp_path: Any) -> None:
    """A run of more ranks than training examples (psctl refuses it; another client may create it):
    the rank left without examples fails the run before training, in the run's terms (it said
    "BatchSampler needs n_examples >= 1, ... got 0, 16, 0, 3"), and the others are not held."""
    path = tmp_path / "six.npz"
    np.savez(path, X=np.zeros((6, 2)), y=np.array([0, 1] * 3))
    spec = build_run_spec(LaunchOptions(model="softmax", dataset=f"npz:{path},test_fraction=0.5", workers=3,
                                        staleness=0, iterations=20, batch_size=16))
    spec.num_workers = 4
    async with InMemoryServer() as server:
        _, outcomes = await asyncio.wait_for(_train_all(server, spec), 60)
    failed = [o for o in outcomes if o.failed]
    assert [o.rank for o in failed] == [3], outcomes
    assert failed[0].reason == ("DatasetError: rank 3's shard is empty: the training split of npz:six.npz has 3 "
                                "examples for the run's 4 ranks, and every rank needs at least one; create the run "
                                "with at most 3 workers"), failed[0].reason
    assert not any(o.completed for o in outcomes), outcomes


async def _behind_a_straggler(spec: pb.RunSpec) -> tuple[Outcome, pb.Run]:
    """Rank 0 trains on a server whose park limit is 0.2 s while rank 1 holds back until rank 0's
    pulls have been parked for 2 s in all, then trains to the end: rank 0's outcome, and the run."""
    async with InMemoryServer(max_wait_seconds=0.2) as server:
        async with server.client() as admin:
            run = await admin.create_run(spec)
        c0, c1 = server.client(), server.client()
        j0 = (await c0.join("w0", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
        j1 = (await c1.join("w1", run.run_id, max_wait=0, capabilities=CAPABILITIES)).assignment
        rank0 = asyncio.create_task(train(c0, j0, dataclasses.replace(CONFIG, timeout_seconds=0.2)))
        core = server.registry.get(run.run_id)
        while core.counters.parked_seconds < 2.0 and not rank0.done():  # (its call gave up after 0.8 s)
            await asyncio.sleep(0.05)
        held = (await c1.pull(run.run_id, j1.rank, j1.incarnation, 0)).tensors
        for clock in range(spec.iterations):  # rank 1, the straggler, trains at last
            await c1.push(run.run_id, j1.rank, j1.incarnation, clock, {n: np.zeros_like(v) for n, v in held.items()})
        await c1.leave(run.run_id, j1.rank, j1.incarnation, pb.LEAVE_REASON_DONE)
        outcome = await asyncio.wait_for(rank0, 30)
        final = await c1.get_run(run.run_id)
        for c in (c0, c1):
            await c.close()
    return outcome, final


async def test_rank_0_waits_for_a_straggler_past_the_park_limit_to_evaluate_the_final_parameters() -> None:
    """Rank 0 done, its final pull (clock = iterations) parked past the server's limit again and
    again while rank 1 trains on: it asks again for as long (it gave up after 4 x --timeout-seconds,
    ended its assignment without evaluating the final parameters, and left its rank to its lease)."""
    spec = _spec(-1, workers=2, iterations=10)
    outcome, final = await _behind_a_straggler(spec)
    assert outcome.completed, outcome
    assert outcome.stats.final_accuracy is not None
    assert final.state == pb.RUN_STATE_COMPLETED and final.message == "all ranks finished", final.message
    assert final.last_eval.clock == spec.iterations


@pytest.mark.parametrize("staleness", [0, 1])
async def test_a_rank_waits_for_a_straggler_past_the_park_limit_and_keeps_its_rank(staleness: int) -> None:
    """Mid-run, a rank whose pull (BSP: with its push) is parked past the server's limit, again and
    again, behind a rank that trains on (a straggler, a replacement loading its data): it asks
    again for as long (after 4 x --timeout-seconds it ended its assignment without leaving: its
    rank was evicted when its lease expired, its iterations dropped, and a worker with --once exited)."""
    spec = _spec(staleness, workers=2, iterations=6)
    outcome, final = await _behind_a_straggler(spec)
    assert outcome.completed and outcome.stats.iterations == spec.iterations, outcome
    assert final.state == pb.RUN_STATE_COMPLETED and final.message == "all ranks finished", final.message
    assert final.counters.evictions == 0 and final.last_eval.clock == spec.iterations


async def test_an_evicted_worker_gives_up_its_assignment() -> None:
    """Partitioned past its lease, it is evicted; once the partition heals its next call is refused
    as a stale incarnation, and it goes back to waiting for work instead of failing the run."""
    async with InMemoryServer(lease_seconds=0.3, heartbeat_seconds=0.1) as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=1, iterations=10_000))
        client = server.client()
        joined = await client.join("w0", run.run_id, max_wait=0)
        task = asyncio.create_task(train(client, joined.assignment, CONFIG))
        await asyncio.sleep(0.2)
        partitioned = errors.Unavailable(errors.Code.UNAVAILABLE, "partitioned")
        for method in ("PushGradient", "PullParams", "Heartbeat", "ReportMetrics"):
            server.transports[-1].fail(method, partitioned, times=10_000)
        core = server.registry.get(run.run_id)
        while not core.counters.evictions:
            await asyncio.sleep(0.05)
        server.transports[-1].heal()
        outcome = await asyncio.wait_for(task, 30)
        await client.close()
    assert not outcome.completed and not outcome.failed
    assert "stale" in outcome.reason or "evicted" in outcome.reason, outcome.reason
    assert outcome.evicted and outcome.run_state == pb.RUN_STATE_UNSPECIFIED
    assert ending(outcome)[0] == logging.WARNING
    assert core.counters.evictions == 1 and core.state.value == "running"


async def test_an_in_memory_refusal_is_the_typed_error_with_its_reason() -> None:
    async with InMemoryServer() as server, server.client() as ps:
        with pytest.raises(errors.NotFound) as e:
            await ps.get_run("run-nope")
        assert e.value.reason == pb.ERROR_REASON_RUN_NOT_FOUND
        run = await ps.create_run(_spec(0, workers=1))
        a = (await ps.join("w", run.run_id, max_wait=0)).assignment
        with pytest.raises(errors.FailedPrecondition) as e:
            await ps.pull(run.run_id, a.rank, a.incarnation, 3, max_wait=1.0)
        assert e.value.reason == pb.ERROR_REASON_CLOCK_AHEAD and e.value.info.next_clock == 0


def test_the_in_memory_server_needs_no_grpc() -> None:
    """The fake is the real core behind an in-memory transport: nothing of gRPC is loaded."""
    import subprocess
    import sys

    probe = ("import sys, ps_server.testing, worker.trainer; "
             "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_client_class_is_the_sdk_facade() -> None:
    assert PsClient.__module__ == "paramserver.client"


# ------------------------------------------------------------------------------ --slowdown
MS = 0.001


def test_a_straggler_s_work_leaves_out_waiting_and_noise() -> None:
    """Work = median computation + median communication of the iterations not parked behind other
    ranks: neither a wait (50 ms) nor a scheduler hiccup (20 ms) changes what 3x means."""
    s = Straggler(3.0)
    for i in range(64):
        s.owe(20 * MS if i % 5 == 0 else 1 * MS, 50 * MS if i % 2 else 0.5 * MS, parked=bool(i % 2))
    assert s.work() == pytest.approx(1.5 * MS)
    only_parked = Straggler(3.0)
    only_parked.owe(1 * MS, 9 * MS, parked=True)
    only_parked.owe(1 * MS, 7 * MS, parked=True)
    assert only_parked.work() == pytest.approx(8 * MS)  # a bound from below: the least seen


def test_a_straggler_pays_back_what_a_sleep_overran() -> None:
    s = Straggler(3.0)  # work 1.5 ms: 3 ms of delay per iteration
    assert s.owe(1 * MS, 0.5 * MS) == pytest.approx(3 * MS)
    s.paid(3.8 * MS)  # the timer rounded up: 0.8 ms too long
    assert s.owe(1 * MS, 0.5 * MS) == pytest.approx(2.2 * MS)
    s.paid(2.2 * MS)
    assert s.owe(1 * MS, 0.5 * MS) == pytest.approx(3 * MS)
    s.paid(100 * MS)  # descheduled: a stall is forgiven beyond one iteration's delay
    assert s.owe(1 * MS, 0.5 * MS) == 0.0
    assert s.owe(1 * MS, 0.5 * MS) == pytest.approx(3 * MS)
    small = Straggler(1.5)  # 0.3 ms per iteration: too short to sleep, owed until it is not
    assert [small.owe(0.3 * MS, 0.3 * MS) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(1.2 * MS)]


@pytest.mark.parametrize(("argv", "says"), [
    # (inf made a worker sleep for ever after its first push, holding its lease and the run; nan was
    # no slowdown at all, and hid a run's own --slowdown for the rank)
    (["--slowdown", "inf"], "--slowdown inf: use a finite factor >= 1"),
    (["--slowdown", "nan"], "--slowdown nan: use a finite factor >= 1"),
    # (these were taken, then every Join failed as 'not reachable', retried for ever like a server not up yet)
    (["--server", "ps:abc"], "--server 'ps:abc': use HOST:PORT (a port in 1..65535)"),
    (["--server", "127.0.0.1:99999"], "--server '127.0.0.1:99999': use HOST:PORT"),
    (["--server", ":50051"], "--server ':50051': use HOST:PORT"),
])
def test_ps_worker_refuses_flags_that_cannot_work(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.config import parse_config

    with pytest.raises(SystemExit) as exit_:
        parse_config(argv, env={})
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    for target in ("ps:50051", "[::1]:50051", "dns:///ps.example:50051", "unix:/tmp/ps.sock"):  # gRPC's forms
        assert parse_config(["--server", target], env={}).server == target


def test_a_slower_machine_is_a_floor_under_the_work_that_the_factors_multiply() -> None:
    """--step-seconds 0.01 with 1.5 ms of work: 8.5 ms of sleep makes the iteration 10 ms long, 3x
    makes it 30 ms, a tail delay of 10x 100 ms; a floor below the work changes nothing."""
    assert Straggler(1.0, floor=10 * MS).owe(1 * MS, 0.5 * MS) == pytest.approx(8.5 * MS)
    assert Straggler(3.0, floor=10 * MS).owe(1 * MS, 0.5 * MS) == pytest.approx(28.5 * MS)
    always = Straggler(1.0, (1.0, 10.0), np.random.default_rng(0), floor=10 * MS)
    assert always.owe(1 * MS, 0.5 * MS) == pytest.approx(98.5 * MS)
    assert Straggler(3.0, floor=1 * MS).owe(1 * MS, 0.5 * MS) == pytest.approx(3 * MS)


@pytest.mark.parametrize("overlap", [False, True])
async def test_workers_say_which_version_each_gradient_was_computed_on(overlap: bool) -> None:
    """--staleness-aware-lr: every push carries its parameters' version (with --overlap the one
    the gradient was computed on, not the answer that came meanwhile), so every step is scaled,
    by at most 1 (a push that missed one other update keeps the whole rate, as ElasticDL's
    max(1, staleness)); the run learns."""
    async with InMemoryServer() as server:
        run_id, outcomes = await _train_all(server, _spec(-1, workers=4, staleness_aware_lr=True),
                                            dataclasses.replace(CONFIG, overlap=overlap))
        core = server.registry.get(run_id)
    assert all(o.completed for o in outcomes)
    c = core.counters
    assert c.pushes_applied == c.lr_scaled == 160
    assert 0.05 < c.lr_scale_sum / c.lr_scaled < 1.0  # four ranks: pushes missed 2, 3 (overlapping: ~6) updates
    assert outcomes[0].stats.final_accuracy is not None and outcomes[0].stats.final_accuracy > 0.6


async def test_workers_follow_a_bound_changed_while_they_train(caplog: pytest.LogCaptureFixture) -> None:
    """UpdateRun mid-run: each worker learns the new bound from its next answer and trains on to
    completion under it (here from 1 to 4: its cache then skips pulls it could not skip before)."""
    caplog.set_level(logging.INFO, logger="ps_worker")
    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=2, iterations=60))
            clients = [server.client() for _ in range(2)]
            joined = [await c.join(f"w{i}", run.run_id, max_wait=0) for i, c in enumerate(clients)]
            tasks = [asyncio.create_task(train(c, j.assignment, CONFIG)) for c, j in zip(clients, joined, strict=True)]
            while (await admin.get_run(run.run_id)).min_clock < 10:
                await asyncio.sleep(0.005)
            skipped_before = server.registry.get(run.run_id).status().counters.pulls_skipped
            await admin.update_run(run.run_id, staleness=4)
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for c in clients:
            await c.close()
        core = server.registry.get(run.run_id)
    assert all(o.completed for o in outcomes), outcomes
    assert core.counters.pushes_applied == 120 and core.spec.staleness == 4
    learned = [r for r in caplog.records if "the run's staleness is now 4 (was 1)" in r.getMessage()]
    assert len(learned) == 2  # each rank, once
    assert core.status().counters.pulls_skipped > skipped_before


async def test_workers_follow_the_run_s_staleness_schedule(caplog: pytest.LogCaptureFixture) -> None:
    """s = 8 for the first 20% of the clocks, then 2 (``--staleness-schedule 20%=2``): the server
    switches when the min clock reaches 12, each worker learns it, the run completes under it."""
    caplog.set_level(logging.INFO, logger="ps_worker")
    async with InMemoryServer() as server:
        run_id, outcomes = await _train_all(server, _spec(8, workers=2, iterations=60, staleness_schedule="20%=2"))
        core = server.registry.get(run_id)
    assert all(o.completed for o in outcomes)
    assert core.spec.staleness == 2 and core.counters.pushes_applied == 120
    (event,) = [e for e in core.history.events if e.kind == "staleness"]
    assert event.message == "staleness changed from 8 to 2 at min clock 12 (the run's schedule)"
    assert len([r for r in caplog.records if "the run's staleness is now 2 (was 8)" in r.getMessage()]) == 2


@pytest.mark.parametrize("where", ["setup", "gradient"])
async def test_a_worker_out_of_memory_gives_its_rank_back_and_the_run_goes_on(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not enough memory (for the data and model, or later in training) is this worker's, not the
    run's: it leaves with its rank given back, and another worker takes it from there."""
    def short_of_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    async with InMemoryServer() as server:
        async with server.client() as admin:
            run = await admin.create_run(_spec(1, workers=1, iterations=20))
            client = server.client()
            joined = await client.join("w0", run.run_id, max_wait=0)
            with monkeypatch.context() as patch:
                if where == "setup":
                    patch.setattr(trainer_module._Trainer, "setup", short_of_memory)
                else:
                    patch.setattr(trainer_module._Trainer, "gradient", short_of_memory)
                outcome = await asyncio.wait_for(train(client, joined.assignment, CONFIG), 30)
            status = await admin.get_run(run.run_id)
            assert status.state == pb.RUN_STATE_RUNNING and status.workers[0].state == pb.WORKER_STATE_EVICTED
            again = await client.join("w1", run.run_id, max_wait=0)  # the rank goes on with another worker
            second = await asyncio.wait_for(train(client, again.assignment, CONFIG), 30)
            await client.close()
    assert outcome.unfit and not outcome.failed and "not enough memory" in outcome.reason, outcome
    assert ending(outcome) == (logging.INFO, f"run {run.run_id}: rank 0 given back after the error above")
    assert second.completed


async def test_a_worker_keeps_no_history_of_what_it_reported() -> None:
    """The trainer kept every point it reported (its stats' ``points``), which nothing read: a worker's
    memory grew with its run, by some 40 points a second at the default report interval, for as
    long as the run lasted. What the trainer's code holds after a run (its shard of the data, ...)
    does not grow with the run's length."""
    import tracemalloc

    async def held(iterations: int) -> int:
        tracemalloc.start()
        try:
            async with InMemoryServer() as server:
                _, outcomes = await _train_all(server, _spec(2, workers=1, iterations=iterations),
                                               dataclasses.replace(CONFIG, report_seconds=1e-6))
                snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert outcomes[0].completed and outcomes[0].stats.iterations == iterations
        return sum(s.size for s in snapshot.filter_traces([tracemalloc.Filter(True, trainer_module.__file__)])
                   .statistics("filename"))

    short, long = await held(300), await held(1500)
    assert long - short < 20_000, f"the trainer holds {long - short} bytes more after 1200 more iterations"
