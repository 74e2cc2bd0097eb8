"""``psctl launch``: submit a run, optionally follow it, optionally on an embedded local cluster.

Three shapes, one code path for following and reporting:

* submit only: create the run, print its id (workers anywhere pick it up);
* ``--wait``: create it, follow it with a progress bar (``--json``: one object at the end);
* ``--local``: as ``--wait``, on a ps-server and N ps-workers started here and torn down after
  (``local.LocalCluster``). The server boots while the spec is built (the dataset is loaded to
  size the model), the workers start together once the server has named its port.

Returns the exit status: 0 submitted or COMPLETED, 1 FAILED, 2 STOPPED (``follow.EXIT_CODES``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from paramserver import errors
from paramserver.client import PsClient
from paramserver.runtime import exit_with_parent
from paramserver.v1 import paramserver_pb2 as pb
from worker.datasets import parse_dataset
from worker.models import parse_model

from . import facts, render
from .follow import EXIT_CODES, LineLog, follow, follow_local
from .local import LocalCluster, LocalClusterError
from .spec import DEFAULT_SERVER, LaunchOptions, build_run_spec, check_options, iterations_per_epoch, security_from_env

__all__ = ["launch_run"]

SERVER_START_SECONDS = 30.0

SHARDS_SETTLE_SECONDS = 5.0
"""How long the --json report waits for a cluster's servers' final status of the run (server 0 asks
each server for it every second, and once more after the run ended)."""


async def _follow(ps: PsClient, run_id: str, per_epoch: int, json_mode: bool, cluster: LocalCluster | None) -> pb.Run:
    """Follow with a progress bar on stderr (none in JSON mode)."""
    if json_mode:
        def quiet(snap: pb.WatchRunResponse, metrics: pb.GetMetricsResponse | None) -> None:
            return None
        if cluster is not None:
            return await follow_local(ps, cluster, run_id, quiet, metrics_every=None)
        return await follow(ps, run_id, quiet, metrics_every=None)
    err = render.console(stderr=True)
    if not err.is_terminal:  # a log: a line per change, not a bar drawn once at the end
        log = LineLog(lambda line: err.print(line, markup=False, highlight=False))
        if cluster is not None:
            return await follow_local(ps, cluster, run_id, log)
        return await follow(ps, run_id, log)
    progress = render.launch_progress(console=err)
    task = progress.add_task("starting", total=None, epoch="-", loss="-", acc="-")

    def show(snap: pb.WatchRunResponse, metrics: pb.GetMetricsResponse | None) -> None:
        progress.update(task, **render.progress_fields(snap.run, metrics, per_epoch))

    with progress:
        if cluster is not None:
            return await follow_local(ps, cluster, run_id, show)
        return await follow(ps, run_id, show)


async def _followed(ps: PsClient, run_id: str, per_epoch: int, json_mode: bool,
                    cluster: LocalCluster | None) -> tuple[pb.Run, list[dict[str, Any]]]:
    """Follow to the end; with --json also the evaluation history (time to accuracy)."""
    run = await _follow(ps, run_id, per_epoch, json_mode, cluster)
    if not json_mode:
        return run, []
    return await _settled(ps, run), facts.eval_history(await ps.get_metrics(run_id))


async def _settled(ps: PsClient, run: pb.Run) -> pb.Run:
    """``run`` (finished) once server 0 has heard every other server's final status of it, or as it
    is after ``SHARDS_SETTLE_SECONDS`` (a server down). The last snapshot has them as server 0
    last asked, before the end: running at an earlier clock, or not heard from yet at all."""
    deadline = time.monotonic() + SHARDS_SETTLE_SECONDS
    while not all(s.reachable and s.state in EXIT_CODES for s in run.shards) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        run = await ps.get_run(run.run_id)
    return run


def _report(run: pb.Run, json_mode: bool, log_path: str | None, evals: list[dict[str, Any]] | None = None) -> int:
    code = EXIT_CODES.get(run.state, 1)
    if json_mode:
        result: dict[str, Any] = facts.launch_result(run)
        result["evals"] = evals or []
        if run.shards:  # a cluster's: which server held what
            result["shards"] = facts.shard_rows(run)
        if log_path:
            result["log"] = log_path
        print(json.dumps(result), flush=True)
        return code
    print(facts.summary_line(run), flush=True)
    if log_path:
        render.console(stderr=True, highlight=False, markup=False).print(f"the local cluster's log: {log_path}")
    return code


def _submit(o: LaunchOptions, server: str, wait: bool, json_mode: bool, timeout: float) -> int:
    spec = build_run_spec(o)
    per_epoch = iterations_per_epoch(o)
    err = render.console(stderr=True, highlight=False, markup=False)

    async def main() -> tuple[pb.Run, list[dict[str, Any]]]:
        async with PsClient(server, timeout=timeout, security=security_from_env()) as ps:
            run = await ps.create_run(spec)
            if not wait:
                return run, []
            if not json_mode:
                err.print(f"{facts.run_headline(run)} on {server}\n(Ctrl-C stops following, not the run)")
            return await _followed(ps, run.run_id, per_epoch, json_mode, None)

    run, evals = asyncio.run(main())
    if wait:
        return _report(run, json_mode, None, evals)
    if json_mode:
        print(json.dumps({"run_id": run.run_id}), flush=True)
    else:
        print(run.run_id, flush=True)
        given = "" if server == os.environ.get("PSCTL_SERVER", DEFAULT_SERVER) else f" --server {server}"
        err.print(f"start workers with 'ps-worker --server {server}'; follow with 'psctl watch {run.run_id}{given}'")
    return 0


def _local(o: LaunchOptions, verbose: bool, json_mode: bool, timeout: float, servers: int) -> int:
    exit_with_parent()  # started so by a benchmark: stopped (SIGTERM: the teardown below) if it dies
    # Cheap syntax checks before any process starts: a typo must not cost a cluster start-up.
    check_options(o)
    parse_model(o.model)
    parse_dataset(o.dataset)
    err = render.console(stderr=True, highlight=False, markup=False)
    cluster = LocalCluster(o.workers, servers=servers, verbose=verbose)
    try:
        with cluster:
            cluster.start_server()
            cluster.start_workers()  # they wait for the server by themselves
            spec = build_run_spec(o)  # overlaps the server's and the workers' start-up
            per_epoch = iterations_per_epoch(o)
            address = cluster.wait_server(SERVER_START_SECONDS)

            async def main() -> tuple[pb.Run, list[dict[str, Any]]]:
                # (plaintext, no token: the local cluster's children get none, local.NOT_INHERITED)
                async with PsClient(address, timeout=timeout) as ps:
                    await ps.wait_ready(SERVER_START_SECONDS)
                    run = await ps.create_run(spec)
                    if not json_mode:
                        where = f"a local ps-server ({address})" if servers == 1 else \
                            f"{servers} local ps-servers ({', '.join(cluster.addresses)})"
                        err.print(f"{facts.run_headline(run)} on {where}")
                    return await _followed(ps, run.run_id, per_epoch, json_mode, cluster)

            try:
                run, evals = asyncio.run(main())
            except errors.Unavailable as exc:
                cluster.check_server(wait=3.0)  # the better explanation, if the server process died
                cluster.keep_log = True
                raise LocalClusterError(f"lost the local ps-server at {address} ({exc.message}); {cluster.where}") from None
            if run.state != pb.RUN_STATE_COMPLETED:
                cluster.keep_log = True
    except KeyboardInterrupt:
        raise KeyboardInterrupt("stopped the local cluster") from None
    return _report(run, json_mode, cluster.log_path if cluster.keep_log and not verbose else None, evals)


def launch_run(o: LaunchOptions, *, server: str, wait: bool, local: bool, verbose: bool, json_mode: bool,
               timeout: float, servers: int = 1) -> int:
    """Run ``psctl launch``; returns the exit status. Raises ValueError/errors.PsError for the handler."""
    if local:
        return _local(o, verbose, json_mode, timeout, servers)
    return _submit(o, server, wait, json_mode, timeout)
