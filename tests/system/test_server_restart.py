"""The server dies (kill -9) or is stopped (SIGTERM) mid-run; restarted on its data dir, the run completes, a
table run holds what its newest checkpoint holds, and a delta pull of the lost history is answered whole."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from procs import connect, finish, free_port, ps_server, ps_workers, record, watch_until
from support import make_spec

from client.spec import LaunchOptions, build_run_spec
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1.wire import RowsPart
from ps_server.config import ServerConfig
from ps_server.core.checkpoint import CheckpointStore
from ps_server.core.optimizers import make_optimizer
from ps_server.core.store import materialize
from ps_server.server import start_server
from worker.compression import PushCodec

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

async def wait_min_clock(addr: str, run_id: str, clock: int) -> pb.Run:
    async with connect(addr) as c:
        return await watch_until(c, run_id, lambda r: r.min_clock >= clock)


@pytest.mark.parametrize("how", ["kill", "sigterm"])
async def test_server_restart_mid_run_completes(tmp_path: Path, how: str) -> None:
    port = free_port()
    every = 10
    args = ("--port", str(port), "--data-dir", str(tmp_path), "--checkpoint-every", str(every),
            "--lease-seconds", "20")
    spec = build_run_spec(LaunchOptions(model="mlp:32", dataset="digits", workers=3, staleness=2, iterations=120,
                                        batch_size=32, seed=1))
    with ps_workers(f"127.0.0.1:{port}", 3, "--timeout-seconds", "10") as workers:
        with ps_server(*args) as (server, addr):
            async with connect(addr) as c:
                run = await c.create_run(spec)
            stop_clock = random.Random(f"{how}-7").randint(25, 80)  # seeded "random clock"
            before = await wait_min_clock(addr, run.run_id, stop_clock)
            t_stop = time.monotonic()
            if how == "kill":
                server.kill()
            else:
                server.send_signal(signal.SIGTERM)
            code = server.wait(30)
        if how == "sigterm":
            assert code == 0
        (on_disk,) = [ck for ck in CheckpointStore(tmp_path).latest() if ck.meta["run_id"] == run.run_id]
        assert all(w.poll() is None for w in workers), "a worker died with the server"
        with ps_server(*args) as (_, addr):
            async with connect(addr) as c:
                resumed = await c.get_run(run.run_id)
                t_resumed = time.monotonic()
                final = await finish(c, run.run_id, timeout=120)
            codes = [w.wait(30) for w in workers]
    assert final.state == pb.RUN_STATE_COMPLETED, final.message
    assert codes == [0, 0, 0]
    assert all(w.clock == spec.iterations for w in final.workers)
    lost = before.max_clock - resumed.min_clock
    if how == "kill":
        # Resumed from the newest checkpoint on disk (workers may already have pushed past it when
        # the test first asks). How far behind that is depends on the disk: a write still in
        # progress at the kill is lost, and newer snapshots coalesce behind it. Recorded, not bounded.
        assert resumed.min_clock >= on_disk.meta["min_clock"] >= every
    else:
        # the shutdown checkpoint is taken after the last RPC: nothing is lost
        assert resumed.min_clock >= before.min_clock
    assert final.last_eval.eval_accuracy > 0.8
    record(f"server-{how}", stopped_at_min_clock=before.min_clock, resumed_min_clock=resumed.min_clock,
           newest_checkpoint_min_clock=on_disk.meta["min_clock"], steps_lost=max(0, lost), recovery_seconds=round(t_resumed - t_stop, 2),
           final_accuracy=round(final.last_eval.eval_accuracy, 4))


ROWS, DIM = 1000, 4


def _table_spec(optimizer: pb.OptimizerSpec, **kw: object) -> pb.RunSpec:
    spec = make_spec(shapes={"bias": (1,)}, num_workers=2, iterations=50, optimizer=optimizer, **kw)  # type: ignore[arg-type]
    spec.params.append(pb.ParamSpec(name="emb", shape=(ROWS, DIM), initializer=pb.INITIALIZER_NORMAL, scale=1.0,
                                    table=True))
    spec.requires.append("tables")
    return spec


@pytest.mark.parametrize("optimizer", [pb.OptimizerSpec(adagrad=pb.AdagradConfig(learning_rate=0.3)),
                                       pb.OptimizerSpec(ftrl=pb.FtrlConfig(learning_rate=0.3, l1=0.01, l2=0.1))],
                         ids=["adagrad", "ftrl"])
async def test_a_table_run_killed_resumes_its_rows_and_their_optimizer_state_as_the_checkpoint_holds_them(
        tmp_path: Path, optimizer: pb.OptimizerSpec) -> None:
    """kill -9 after pushes of a few rows (s = 2: applied as they come): restarted, the server holds
    the table and its optimizer's per-row state (Adagrad's accumulators, FTRL's z and n) exactly as
    the newest checkpoint on disk has them, bit for bit, the rows no push touched too (still their
    initial draw and initial state)."""
    args = ("--port", "0", "--data-dir", str(tmp_path), "--checkpoint-every", "1")
    spec = _table_spec(optimizer, staleness=2)
    rng = np.random.default_rng(3)
    touched: set[int] = set()
    with ps_server(*args) as (server, addr):
        async with connect(addr) as c:
            run = await c.create_run(spec)
            a = [(await c.join(f"w{i}", run.run_id, capabilities=["tables"])).assignment for i in range(2)]
            for clock in range(4):
                for r in a:
                    ids = rng.integers(0, 40, 6)
                    touched.update(ids.tolist())
                    rows = RowsPart(ids, rng.standard_normal((6, DIM)).astype(np.float32), (ROWS, DIM))
                    await c.push(run.run_id, r.rank, r.incarnation, clock, {"bias": np.ones(1, np.float32), "emb": rows})
        store = CheckpointStore(tmp_path)  # (read only: ``latest`` would remove the server's writes under way)
        for _ in range(500):  # the checkpoint of cut 4 written (each clock's is scheduled as it passes)
            if 4 in store.cuts(run.run_id):
                break
            time.sleep(0.02)
        server.kill()
        server.wait(30)
    (on_disk,) = [ck for ck in CheckpointStore(tmp_path).latest() if ck.meta["run_id"] == run.run_id]
    assert on_disk.meta["min_clock"] == 4
    ps = await start_server(ServerConfig(port=0, data_dir=str(tmp_path), checkpoint_every=0))
    try:
        resumed = ps.registry.get(run.run_id)
        held = {f"param/{n}": a for n, a in resumed.store.params.items()}
        held.update({f"opt/{k}": a for k, a in resumed.optimizer.state_arrays().items()})
        expected = {k: v for k, v in on_disk.arrays.items() if k.startswith(("param/", "opt/"))}
        assert held.keys() == expected.keys() and len(held) == 2 + 2 * len(resumed.optimizer.state_names)
        for key, value in expected.items():
            assert held[key].tobytes() == value.tobytes(), key
        untouched = sorted(set(range(ROWS)) - touched)
        initial = materialize(tuple(resumed.store.specs.values()), spec.seed)["emb"]
        assert resumed.store.params["emb"][untouched].tobytes() == initial[untouched].tobytes()
        fresh = make_optimizer(resumed.optimizer.config, tuple(resumed.store.specs.values())).state_arrays()
        for key, state in resumed.optimizer.state_arrays().items():
            if key.endswith("/emb"):
                assert state.reshape(ROWS, DIM)[untouched].tobytes() == \
                    fresh[key].reshape(ROWS, DIM)[untouched].tobytes(), key
    finally:
        await ps.stop(0)


async def test_a_delta_pull_after_a_restart_that_lost_updates_is_answered_whole(tmp_path: Path) -> None:
    """A top-k run (plain SGD: delta pulls) checkpointed at version 0 only: a worker holds version 3
    of the parameters; the server is killed and resumes at version 0, then applies new pushes past
    version 3. The worker's pull since version 3 of the old history must not be a delta of the new
    one (the elements changed since "3" there are not what its copy lacks): it is answered whole,
    and the copy equals the server's parameters."""
    args = ("--port", str(free_port()), "--data-dir", str(tmp_path), "--checkpoint-every", "0")
    compression = pb.Compression(topk_ratio=0.01)
    spec = make_spec(shapes={"w": (200, 100)}, num_workers=1, staleness=-1, iterations=20, lr=0.5,
                     compression=compression)
    rng = np.random.default_rng(4)

    def gradient() -> dict[str, np.ndarray]:
        return {"w": rng.standard_normal((200, 100)).astype(np.float32)}

    mine: dict[str, np.ndarray] = {}
    with ps_server(*args) as (server, addr):
        async with connect(addr) as c:
            run = await c.create_run(spec)
            a = (await c.join("w0", run.run_id)).assignment
            await c.checkpoint_run(run.run_id)  # the only checkpoint with the rank: at version 0
            codec = PushCodec(compression)
            got = await c.pull(run.run_id, a.rank, a.incarnation, 0, into=mine)
            for clock in range(3):
                _, got = await c.push_pull(run.run_id, a.rank, a.incarnation, clock, codec.encode(gradient()), into=mine,
                                           since=(got.lineage, got.version))
            assert got.delta and got.version == 3
            old = (got.lineage, got.version)
        server.kill()
        server.wait(30)
    with ps_server(*args) as (_, addr):
        async with connect(addr) as c:
            assert (await c.get_run(run.run_id)).counters.updates_applied == 0  # resumed at version 0
            codec = PushCodec(compression)
            for clock in range(5):  # the same incarnation, back at clock 0 (the worker would rewind)
                await c.push(run.run_id, a.rank, a.incarnation, clock, codec.encode(gradient()))
            got = await c.pull(run.run_id, a.rank, a.incarnation, 5, into=mine, since=old)
            assert not got.delta and got.version == 5 and got.lineage != old[0]
            whole = (await c.pull(run.run_id)).tensors
    np.testing.assert_array_equal(mine["w"], whole["w"])
