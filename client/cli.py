"""``psctl``: the paramserver command line. Thin: parse options, call ``PsClient``, hand to ``render``.

Every command takes ``--server HOST:PORT`` (default ``$PSCTL_SERVER``, then 127.0.0.1:50051),
``--json`` (plain JSON on stdout, no markup; not ``dashboard``) and ``--timeout`` (seconds per RPC). Errors go through
one handler (:func:`_handled`): ``Error: <message>`` on stderr and exit status 1 (130 on Ctrl-C).
Following a run (``launch --wait``, ``launch --local``, ``watch``) exits 0 if it COMPLETED,
1 if it FAILED, 2 if it was STOPPED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
import typer
from rich.live import Live

from paramserver import errors
from paramserver.client import PsClient
from paramserver.security import tls_problem
from paramserver.v1 import paramserver_pb2 as pb

from . import facts, render
from .launch import launch_run
from .spec import DEFAULT_SERVER, LaunchOptions, parse_staleness, security_from_env

__all__ = ["app"]

T = TypeVar("T")

app = typer.Typer(
    name="psctl", no_args_is_help=True, rich_markup_mode="markdown", add_completion=False, pretty_exceptions_enable=False,
    help="Control a paramserver: launch training runs, watch them, inspect and export them.\n\n"
    "Exit status: 0 ok; 1 error (printed as 'Error: ...' on stderr) or the followed run FAILED; "
    "2 the followed run was STOPPED (or a usage error); 130 interrupted.\n\n"
    "TLS and the token come from the environment only: PSCTL_TLS_CA, PSCTL_TLS_CERT, PSCTL_TLS_KEY, "
    "PSCTL_TLS_SERVER_NAME, PS_TOKEN or PSCTL_TOKEN_FILE, PSCTL_INSECURE=1 (a token over plaintext).",
)

Server = Annotated[str, typer.Option("--server", envvar="PSCTL_SERVER", metavar="HOST:PORT",
                                     help="Parameter server address.")]
Json = Annotated[bool, typer.Option("--json", help="Print plain JSON on stdout (no colours, no tables; enum values "
                                                   "as short lower-case names, times as Unix seconds).")]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Deadline of each RPC, in seconds.")]
RunId = Annotated[str, typer.Argument(metavar="RUN", help="Run id, as shown by 'psctl runs'.")]


# ---------------------------------------------------------------------------------------- plumbing
def parse_slowdown(items: Sequence[str]) -> tuple[tuple[int, float], ...]:
    """['2=3.0', '0=1.5'] -> ((2, 3.0), (0, 1.5)): rank 2 runs 3x slower, rank 0 1.5x."""
    out: dict[int, float] = {}
    for item in items:
        rank, eq, factor = str(item).partition("=")
        try:
            r, f = int(rank), float(factor)
        except ValueError:
            r, f = -1, 0.0
        if not eq or r < 0 or not (f >= 1.0 and math.isfinite(f)):
            raise ValueError(f"--slowdown {item!r}: use RANK=FACTOR with a rank >= 0 and a factor >= 1, e.g. 1=3")
        out[r] = f
    return tuple(sorted(out.items()))



def _error(exc: BaseException, server: str) -> str:
    """The one place that turns an exception into the sentence a user reads."""
    if isinstance(exc, errors.Unavailable) and exc.reason == pb.ERROR_REASON_SHARD_UNAVAILABLE:
        return (f"{exc.message} ({server} answered: another server of its cluster did not, or is going back to a "
                "checkpoint; bring it back, or retry)")
    if isinstance(exc, errors.Unavailable):
        with contextlib.suppress(ValueError):  # (settings that cannot work were said before any call)
            problem = tls_problem(server, security_from_env())
            if problem:
                return f"cannot talk to the paramserver at {server}: {problem}"
        tls = "" if os.environ.get("PSCTL_TLS_CA") else " (one that requires TLS needs PSCTL_TLS_CA)"
        return (f"cannot reach a paramserver at {server} ({exc.message}). Start one with "
                f"'ps-server --port {server.rpartition(':')[2] or 50051}', point --server (or PSCTL_SERVER) "
                f"at a running one{tls}, or train on a self-contained cluster with 'psctl launch --local'.")
    if isinstance(exc, errors.DeadlineExceeded):
        return (f"no answer from {server} in time ({exc.message}): is a paramserver running there and "
                f"reachable? If it is just busy, try a larger --timeout.")
    if isinstance(exc, errors.PsError):
        return f"{exc.code.name}: {exc.message}"
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted: {exc}" if str(exc) else "interrupted"
    if isinstance(exc, MemoryError):
        return ("not enough memory on this machine for what was asked (psctl builds the run's dataset here: a "
                "synthetic one this large does not fit); ask for a smaller one")
    return str(exc) or type(exc).__name__


def _handled(func: Callable[..., None]) -> Callable[..., None]:
    """Wrap a command in the single error handler: 'Error: <message>' on stderr, non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # the reader of stdout went away (psctl ... | head): nothing more to say
            _quiet_stdout()
            raise typer.Exit(1) from None
        except (errors.PsError, ValueError, OSError, RuntimeError, MemoryError, KeyboardInterrupt) as exc:
            typer.echo(f"Error: {_error(exc, kwargs.get('server', ''))}", err=True)
            raise typer.Exit(130 if isinstance(exc, KeyboardInterrupt) else 1) from None

    return wrapper


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no broken pipe either
    (as rich's console does when its reader is gone)."""
    with contextlib.suppress(OSError, ValueError):  # (no descriptor: a test's captured output)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _address(server: str) -> str:
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        given = f"PSCTL_SERVER={server!r}" if os.environ.get("PSCTL_SERVER") == server else f"--server {server!r}"
        raise ValueError(f"{given}: use HOST:PORT (a port in 1..65535), for example 127.0.0.1:50051")
    return server


def _write_atomically(path: str, write: Callable[[Any], None], flag: str = "-o") -> None:
    """``write`` into a new file beside ``path`` (the option ``flag`` named), renamed over it once
    whole: a failure (a full disk, an interrupt) leaves whatever ``path`` held before, never a torn file."""
    if path.endswith(os.sep) or os.path.isdir(path):
        raise ValueError(f"{flag} {path!r}: a directory; name the file to write, such as "
                         f"{os.path.join(path, 'FILE')}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".psctl-", suffix=".tmp", dir=folder)
    except OSError as exc:  # (its message names the temporary file, which the user never asked for)
        raise ValueError(f"{flag} {path!r}: cannot create a file in {folder} ({exc.strerror or exc}); "
                         "write into an existing directory you may write to") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _with_client(server: str, timeout: float, body: Callable[[PsClient], Coroutine[Any, Any, T]]) -> T:
    async def main() -> T:
        async with PsClient(_address(server), timeout=timeout, security=security_from_env()) as ps:
            return await body(ps)

    return asyncio.run(main())


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str))


# ---------------------------------------------------------------------------------------- commands
@app.command()
@_handled
def launch(
    model: Annotated[str, typer.Option(help="linear | softmax | mlp:H1,H2[:ACTIVATION] (relu, tanh, sigmoid) | "
                                            "logistic[:rows=N] | fm:K[:rows=N] | mf:K[:reg=L]")] = "mlp:64",
    dataset: Annotated[str, typer.Option(help="digits | synthetic-regression | synthetic-classification | "
                                              "synthetic-ctr | synthetic-ratings | npz:PATH | libsvm:PATH (options "
                                              "after ':' as key=value)")] = "digits",
    workers: Annotated[int, typer.Option(min=1, help="Number of worker ranks (data shards).")] = 4,
    staleness: Annotated[str, typer.Option(help="0 or bsp (synchronous), a positive integer s (SSP), "
                                                "inf / unbounded / asp (asynchronous).")] = "2",
    optimizer: Annotated[str, typer.Option(help="sgd | momentum | nesterov | adam | adagrad | ftrl")] = "sgd",
    lr: Annotated[float, typer.Option(help="Learning rate (ftrl: its alpha).")] = 0.1,
    momentum: Annotated[float, typer.Option(help="Momentum (momentum, nesterov).")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay (sgd, momentum, nesterov, adam).")] = 0.0,
    l1: Annotated[float, typer.Option("--l1", help="FTRL's L1 strength (ftrl only; >= 0, 0 = none): weights "
                                                   "exactly zero.")] = 0.0,
    l2: Annotated[float, typer.Option("--l2", help="FTRL's L2 strength (ftrl only; >= 0, 0 = none).")] = 0.0,
    ftrl_beta: Annotated[float, typer.Option(help="FTRL's beta (ftrl only; > 0).")] = 1.0,
    epochs: Annotated[float, typer.Option(help="Passes over each rank's shard (> 0, e.g. 15 or 0.5).")] = 15.0,
    iterations: Annotated[int, typer.Option(help="Iterations per worker; overrides --epochs (0: use --epochs).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Minibatch size per worker.")] = 32,
    seed: Annotated[int, typer.Option(min=0, help="Seed for initialisation and shuffling.")] = 0,
    name: Annotated[str, typer.Option(help="Run name shown by psctl (default: MODEL on DATASET).")] = "",
    eval_every: Annotated[int, typer.Option(min=0, help="Evaluate every N iterations; 0 = ~20 times.")] = 0,
    aggregation: Annotated[str, typer.Option(help="BSP gradient combination: mean | sum.")] = "mean",
    compress: Annotated[str, typer.Option(help="Less on the wire: none | fp16 | bf16 (pushes and pulls in half "
                                          "precision) | topk:RATIO (pushes carry that share of each tensor, the "
                                          "rest kept for later), e.g. topk:0.01,fp16. See README, compression.")] = "none",
    staleness_schedule: Annotated[str, typer.Option(help="Change the bound as the run goes: CLOCK=S steps, CLOCK a "
                                                     "min clock or a share of the iterations, e.g. 20%=2,50%=1 "
                                                     "(not to or from 0).")] = "",
    staleness_aware_lr: Annotated[bool, typer.Option("--staleness-aware-lr", help="Divide each push's learning rate "
                                                     "by its staleness (updates applied since the parameters it was "
                                                     "computed on were read; Zhang et al. 2016). Not with ftrl.")] = False,
    slowdown: Annotated[list[str] | None, typer.Option(metavar="RANK=FACTOR",
                                                       help="Make a rank FACTOR times slower (repeatable).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run with a progress bar on stderr until it ends "
                                                      "(without a terminal: a line each time the run changes).")] = False,
    local: Annotated[bool, typer.Option("--local", help="Start a server and --workers workers on 127.0.0.1, run, "
                                                        "tear them down (implies --wait).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="With --local: show the children's logs.")] = False,
    servers: Annotated[int, typer.Option(min=1, help="With --local: this many ps-servers holding the run's "
                                                      "parameters together (a cluster; each tensor on one, large "
                                                      "ones split over all).")] = 1,
    server: Server = DEFAULT_SERVER,
    json_: Json = False,
    timeout: Timeout = 10.0,
) -> None:
    """Create a training run (and with --wait or --local, follow it to the end).

    Without --wait: print the run id; workers started with 'ps-worker --server HOST:PORT' pick it up.

    --local: start a ps-server on a free port (--servers N: a cluster of N) and --workers ps-worker processes on 127.0.0.1 (at a lower CPU priority: ps-worker --nice 10), run, and stop them all when the run ends, fails or is interrupted; if psctl is killed (SIGKILL), they stop by themselves (Linux) (--server is ignored).

    Exit status with --wait or --local: 0 the run COMPLETED, 1 it FAILED (or psctl hit an error), 2 it was STOPPED, 130 interrupted.
    """
    options = LaunchOptions(
        model=model, dataset=dataset, workers=workers, staleness=parse_staleness(staleness), optimizer=optimizer, lr=lr,
        momentum=momentum, weight_decay=weight_decay, l1=l1, l2=l2, ftrl_beta=ftrl_beta, epochs=epochs, iterations=iterations, batch_size=batch_size,
        seed=seed, name=name, eval_every=eval_every, aggregation=aggregation, slowdown=parse_slowdown(slowdown or ()),
        compress=compress, staleness_aware_lr=staleness_aware_lr, staleness_schedule=staleness_schedule,
    )
    if servers > 1 and not local:
        raise ValueError(f"--servers {servers} needs --local; start a cluster by hand with 'ps-server --cluster "
                         "ADDR0,ADDR1,... --index I' (README: several servers)")
    if verbose and not local:
        raise ValueError("--verbose needs --local: it shows the logs of the server and workers --local starts "
                         "(those started by hand log where they were started)")
    code = launch_run(options, server=_address(server), wait=wait or local, local=local, verbose=verbose,
                      json_mode=json_, timeout=timeout, servers=servers)
    raise typer.Exit(code)


@app.command()
@_handled
def runs(limit: Annotated[int, typer.Option(min=1, help="Show at most this many (the newest).")] = 100,
         server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """List the server's runs, newest first."""
    found = _with_client(server, timeout, lambda ps: ps.list_runs(limit))
    if json_:
        _print_json([facts.run_facts(r) for r in found])
    elif not found:
        typer.echo(f"no runs on {server} yet: create one with 'psctl launch'")
    else:
        render.console().print(render.runs_table(found))


async def _run_and_metrics(ps: PsClient, run_id: str, records: bool = False) -> tuple[pb.Run, pb.GetMetricsResponse]:
    run = await ps.get_run(run_id)
    return run, await ps.get_metrics(run_id, include_clock_records=records)


@app.command()
@_handled
def status(run_id: RunId, server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """A run's state, workers, clocks (who waits on whom), counters, metrics trend and events.

    --json: {"run": the run as the server sent it, "summary": the facts the view shows, "workers", "shards" (a cluster's servers), "eval", "last_train_loss", "events"}.
    """
    run, metrics = _with_client(server, timeout, lambda ps: _run_and_metrics(ps, run_id))
    if json_:
        _print_json(facts.status_dict(run, metrics))
    else:
        render.console().print(render.status_view(run, metrics))


@app.command()
@_handled
def watch(run_id: RunId, server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """The status view, live, until the run ends (--json: one JSON line per snapshot).

    When stdout is not a terminal (a pipe, a file): one plain-text line each time the run changes (time, state, min clock / iterations, active workers, what it waits for, train loss, test accuracy; a CTR model's: test AUC and log-loss), then the final status view.

    Exit status: 0 the run COMPLETED, 1 it FAILED (or psctl hit an error), 2 it was STOPPED.
    """
    from .follow import EXIT_CODES, LineLog, follow

    out = render.console()

    async def body(ps: PsClient) -> pb.Run:
        if json_:
            def line(snap: pb.WatchRunResponse, metrics: pb.GetMetricsResponse | None) -> None:
                doc = facts.status_dict(snap.run, metrics)  # (the evaluations and train loss the view shows)
                doc["events"] = [facts.message_to_dict(e) for e in snap.events]
                _print_json(doc)
            return await follow(ps, run_id, line)
        if not out.is_terminal:
            log = LineLog(typer.echo)
            run = await follow(ps, run_id, log)
            out.print(render.status_view(run, log.metrics))
            return run
        with Live(console=out, auto_refresh=False) as live:
            def show(snap: pb.WatchRunResponse, metrics: pb.GetMetricsResponse | None) -> None:
                live.update(render.status_view(snap.run, metrics), refresh=True)
            return await follow(ps, run_id, show)

    final = _with_client(server, timeout, body)
    raise typer.Exit(EXIT_CODES.get(final.state, 1))


@app.command()
@_handled
def stop(run_id: RunId, reason: Annotated[str, typer.Option(help="Why (shown in the run's message).")] = "",
         server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """Stop a run: its workers go back to waiting for work. Stopping a finished run changes nothing."""
    run = _with_client(server, timeout, lambda ps: ps.stop_run(run_id, reason))
    if json_:
        _print_json({"run_id": run.run_id, "state": facts.state_name(run.state), "message": run.message})
    else:
        typer.echo(f"{run.run_id}: {facts.state_name(run.state)}" + (f" ({run.message})" if run.message else ""))


@app.command("set")
@_handled
def set_(run_id: RunId,
         staleness: Annotated[str | None, typer.Option(help="The new bound: a positive integer s, or inf/unbounded/asp. "
                                                            "Not to or from 0 (BSP).")] = None,
         server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """Change a running run: its staleness bound, at once. Parked pulls are re-evaluated against the
    new bound now; each worker applies it from its next iteration (the iteration it is computing
    finishes under the bound it started with)."""
    if staleness is None:
        raise typer.BadParameter("say what to change: --staleness N")
    try:
        bound = parse_staleness(staleness)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run = _with_client(server, timeout, lambda ps: ps.update_run(run_id, staleness=bound))
    if json_:
        _print_json({"run_id": run.run_id, "staleness": run.spec.staleness, "state": facts.state_name(run.state)})
    else:
        typer.echo(f"{run.run_id}: staleness {facts.staleness_text(run.spec.staleness)}")


@app.command()
@_handled
def delete(run_id: RunId,
           force: Annotated[bool, typer.Option("--force", help="Stop the run first if it is still going.")] = False,
           server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 60.0) -> None:
    """Delete a finished run: the server forgets it and deletes its checkpoints (export it first to keep it)."""
    resp = _with_client(server, timeout, lambda ps: ps.delete_run(run_id, force))
    run = resp.run
    if json_:
        _print_json({"run_id": run.run_id, "deleted": True, "state": facts.state_name(run.state),
                     "left_behind": resp.left_behind})
    else:
        typer.echo(f"{run.run_id}: deleted ({facts.state_name(run.state)})")
        if resp.left_behind:
            typer.echo(f"warning: its files could not all be removed: {resp.left_behind}; remove them by hand",
                       err=True)


@app.command()
@_handled
def checkpoint(run_id: RunId, server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """Checkpoint a run now (the server needs --data-dir); prints where it was written. Waits --timeout plus 30 s
    per GiB of the run's parameters and optimizer state (and 30 s more for a running run over several servers)."""
    resp = _with_client(server, timeout, lambda ps: ps.checkpoint_run(run_id))
    if json_:
        _print_json({"run_id": run_id, "path": resp.path, "min_clock": resp.min_clock})
    else:
        typer.echo(f"{run_id}: checkpoint at min clock {resp.min_clock} in {resp.path} (on the server)")


@app.command()
@_handled
def export(run_id: RunId,
           output: Annotated[str, typer.Option("--output", "-o", help="Where to write (default RUN.npz).")] = "",
           server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 60.0) -> None:
    """Save a run's current parameters to an .npz file (an observer's pull: never waits for the run); a
    run held by several servers is read from each and put together, all of one history (while they go
    back to a common checkpoint it waits for them, up to --timeout; a run that ended before they were
    back to one history cannot be exported, and it says so at once)."""
    from paramserver.shards import pull_run
    from paramserver.sink import PullResult

    async def read(ps: PsClient) -> PullResult:
        await ps.get_run(run_id)  # (--server out of reach: the handler says so, and how to start one)
        try:
            return await pull_run(ps, run_id, wait=timeout)
        except errors.Unavailable as exc:  # another server of the run, or its servers going back to a checkpoint
            raise RuntimeError(exc.message) from None

    result = _with_client(server, timeout, read)
    path = output or f"{run_id}.npz"
    _write_atomically(path, lambda fh: np.savez(fh, **result.tensors))  # type: ignore[arg-type]
    count = sum(int(a.size) for a in result.tensors.values())
    if json_:
        _print_json({"path": path, "run_id": run_id, "tensor_count": len(result.tensors), "params": count,
                     "tensors": {n: list(a.shape) for n, a in result.tensors.items()}, "version": result.version,
                     "guaranteed_clock": result.guaranteed_clock, "run_state": facts.state_name(result.run_state)})
    else:
        typer.echo(f"wrote {path}: {facts.counted(len(result.tensors), 'tensor')}, {count:,} "
                   f"parameter{'s' * (count != 1)} (version {result.version}, clock {result.guaranteed_clock}, "
                   f"run {facts.state_name(result.run_state)})")


@app.command()
@_handled
def plot(run_id: RunId,
         output: Annotated[str, typer.Option("--output", "-o", help="Image file, in the format its extension "
                                                                    "names: .png (also without one), .svg, .pdf "
                                                                    "(default RUN.png).")] = "",
         server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """Plot train loss (per rank) and test accuracy/loss (a CTR model's: AUC and log-loss) against time and clock."""
    from .plots import image_format, save_curves  # matplotlib: only this command pays for importing it
    path = output or f"{run_id}.png"
    fmt = image_format(path, "-o")
    run, metrics = _with_client(server, timeout, lambda ps: _run_and_metrics(ps, run_id))
    _write_atomically(path, lambda fh: save_curves(run, metrics, fh, fmt))
    evals = sum(p.eval for p in metrics.points)
    if json_:
        _print_json({"path": path, "run_id": run_id, "points": len(metrics.points), "eval_points": evals})
    else:
        typer.echo(f"wrote {path}: {facts.counted(len(metrics.points) - evals, 'training point')}, "
                   f"{facts.counted(evals, 'evaluation')}")


@app.command()
@_handled
def metrics(run_id: RunId, server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 10.0) -> None:
    """A run's metrics history: training and evaluation points, events, and the server's clock records.

    --json: {"points": [...], "events": [...], "clock_records": [...]}: every point and event, and the clock records the server keeps (the most recent, in memory: a restarted server has those since it resumed the run; each a served pull or an accepted push with the min clock at that moment: the evidence that the staleness bound held).
    """
    got = _with_client(server, timeout, lambda ps: ps.get_metrics(run_id, include_clock_records=True))
    if json_:
        _print_json(facts.message_to_dict(got))
        return
    evals = [p for p in got.points if p.eval]
    typer.echo(f"{run_id}: {facts.counted(len(got.points) - len(evals), 'training point')}, "
               f"{facts.counted(len(evals), 'evaluation')}, {facts.counted(len(got.events), 'event')}, "
               f"{facts.counted(len(got.clock_records), 'clock record')}")
    losses = [p.loss for p in got.points if not p.eval]
    typer.echo("train loss (log scale) " + render.sparkline(losses, 60, log=True))
    if evals:
        typer.echo("evaluations (rank 0, test split):")
    for p in evals:
        auc = facts.auc(p)  # a binary (CTR) model's: its test loss is the log-loss
        loss = "log-loss" if auc is not None else "loss"
        accuracy = facts.finite(p.eval_accuracy)  # (None: a regression's)
        typer.echo(f"  clock {p.clock:>6}  test {loss} {facts.fmt(p.eval_loss)}"
                   + (f"  test accuracy {facts.fmt(accuracy)}" if accuracy is not None else "")
                   + (f"  test AUC {facts.fmt(auc)}" if auc is not None else ""))
    if got.events:
        typer.echo("events:")
    for e in facts.event_rows(got):
        typer.echo(f"  {e['when']}  {e['kind']:<10} {e['rank']:<7} {e['message']}")
    lead = facts.pull_lead(got)
    if lead is not None:
        typer.echo(f"clock records: served pulls were at most {facts.counted(lead, 'clock')} ahead of the min clock "
                   f"(SSP allows up to the run's staleness); --json lists them")


def parse_bounds(text: str) -> list[int]:
    """'0,1,4,inf' -> [0, 1, 4, -1] (each as --staleness takes it; repeats dropped)."""
    bounds: list[int] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            raise ValueError(f"--staleness {text!r}: a comma-separated list of bounds, e.g. 0,1,4,inf")
        bound = parse_staleness(item)
        if bound not in bounds:
            bounds.append(bound)
    return bounds


@app.command("simulate")
@_handled
def simulate_(run_id: RunId,
              staleness: Annotated[str, typer.Option(help="The bounds to predict, comma-separated: 0 or bsp, a "
                                                          "positive integer, inf.")] = "0,1,4,inf",
              plot: Annotated[str, typer.Option("--plot", metavar="FILE.png", help="Also draw the predictions "
                                                "(time per clock, each rank's idle share) into this image.")] = "",
              server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 30.0) -> None:
    """What if the run had another staleness bound? Replays its recorded step times under each bound
    and predicts the time per clock, pushes per second and each rank's idle share.

    From the server's clock records (a pull served, a push accepted, per rank and clock: the most
    recent 100,000, in memory: a restarted server has those since it resumed the run) it takes each rank's work per clock (pull served -> push accepted), the latency
    of its pulls that did not wait, how long a parked pull took to be served once let go, and when
    each rank started; then runs the ranks in virtual time through the server's own gate and SSP
    rule (a real run, instantly), once per bound. A rank's idle share is the part of the run's time
    its pulls were parked. A run whose bound changed while it ran (psctl set, a schedule) is taken
    as recorded under the tightest bound it had (the server's Run.tightest_staleness), with a note.

    Assumed: a rank's work per clock and its pull latency do not depend on the bound; CPU and network
    contention is not modelled (with fewer cores than workers, parked workers free cores: predictions
    for bounds looser than the recorded one are then optimistic, for tighter ones pessimistic); pulls
    a worker skipped (fresh cache) stay skipped; evictions and restarts are not replayed. The replay
    of the run's own bound, beside the measurement, shows how far to trust the others. Measured
    (bench/RESULTS.md): within 15% of real runs at other bounds when each worker had cores of its
    own; off by a median 26% with 4-8 workers sharing 2 cores with the server.

    Only the clocks every rank has pushed are replayed; the recorded pushes/s counts every push in
    their time (of a run still going whose ranks are far apart, of later clocks too: a note says so).

    --json: {"run_id", "ranks", "clocks", "first_clock", "recorded", "replay" (with "error": its time
    per clock against the measured one, as a fraction), "predictions": [...], "notes"}; each with
    time_per_clock_s, run_seconds, pushes_per_second, idle_share_mean, idle_share (per rank),
    most_idle_rank, most_idle_share (staleness -1: unbounded).
    """
    from . import simulate as sim
    from .trace import Trace

    try:
        bounds = parse_bounds(staleness)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if plot:
        from .plots import image_format, save_simulation  # matplotlib: only --plot pays for importing it
        fmt = image_format(plot, "--plot")
    run, metrics = _with_client(server, timeout, lambda ps: _run_and_metrics(ps, run_id, records=True))
    if not metrics.clock_records:
        raise ValueError((f"run {run_id} has no clock records yet: start its workers, or wait until they have pushed"
                          if run.state in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING) else
                          f"run {run_id} is {facts.state_name(run.state)}, and this server has no clock records of it (they are kept in "
                          "memory: a server restarted since it ended has none)")
                         + (" (a run held by several servers: ask server 0, --server)" if run.shards else ""))
    recorded, changed = facts.bounds_in_force(run, metrics)
    trace = Trace.from_records(facts.clock_records(metrics), run.spec.num_workers, run.spec.iterations, recorded)
    wanted = [*bounds, recorded] if recorded not in bounds else bounds
    predictions = sim.simulate_all(trace, wanted, sim.processes_for(trace, wanted))
    replayed = next(p for p in predictions if p.staleness == recorded)
    doc = {"run_id": run_id, **sim.report(trace, recorded, predictions[:len(bounds)], replayed, changed)}
    if run.state in (pb.RUN_STATE_PENDING, pb.RUN_STATE_RUNNING):
        doc["notes"].append(f"the run is {facts.state_name(run.state)}: the replay covers the clocks pushed so far")
    if plot:
        _write_atomically(plot, lambda fh: save_simulation(doc, fh, fmt), "--plot")
        doc["plot"] = plot
    if json_:
        _print_json(doc)
        return
    render.console().print(render.simulation_view(doc))
    if plot:
        typer.echo(f"wrote {plot}")


def _opener(url: str) -> Path:
    """A file only this user may read that sends a browser to ``url``: a browser started with the
    address itself would show the dashboard's key in its command line, to every user (as Jupyter does)."""
    fd, path = tempfile.mkstemp(prefix="psctl-dashboard-", suffix=".html")  # (mode 0600)
    with os.fdopen(fd, "w") as f:
        f.write(f'<!doctype html><meta http-equiv="refresh" content="0;url={url}"><a href="{url}">dashboard</a>\n')
    return Path(path)


@app.command()
@_handled
def dashboard(port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one).")] = 8265,
              host: Annotated[str, typer.Option(help="Address to listen on. The page can stop runs: keep it on "
                                                     "127.0.0.1 unless the network is yours.")] = "127.0.0.1",
              open_: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
              allow_host: Annotated[list[str] | None, typer.Option(
                  help="A name the page is reached by, besides 127.0.0.1, localhost and ::1 (repeatable): it answers "
                       "no other (a web page whose name was pointed at it, DNS rebinding, cannot use it). Listening "
                       "on another address than loopback without it, it answers every name.")] = None,
              server: Server = DEFAULT_SERVER, timeout: Timeout = 10.0) -> None:
    """A live web page of the cluster's runs: the runs list, and per run the worker clocks against
    the SSP window (the rank holding it back, what each parked rank waits for), loss, accuracy and
    throughput curves, the staleness histogram, the servers, the events, stop and checkpoint.

    It talks to the parameter server as psctl does (--server, TLS and token from the same
    environment), fed by WatchRun; the parameter server gets no new port. Runs until interrupted.
    With a token or a client certificate, the address printed carries a key: only a browser that
    opened it (or a request with 'authorization: Bearer KEY') is answered.
    """
    from .dashboard.server import LOOPBACK, host_name, serve

    address = _address(server)

    def ready(url: str) -> None:
        typer.echo(f"paramserver dashboard on {url} (the cluster at {address}); Ctrl-C stops it", err=True)
        if host_name(host) not in LOOPBACK:
            who = ("whoever reads its address (the key crosses the network in clear)" if "?key=" in url
                   else "whoever reaches this port")
            pages = "" if allow_host else (", and a web page whose name is pointed at it (DNS rebinding): name "
                                           "those it is reached by with --allow-host")
            typer.echo(f"warning: listening on {host}: {who} can stop and checkpoint runs{pages}", err=True)
        if open_:
            import webbrowser
            if "?key=" in url:
                opened.append(_opener(url))
            if not webbrowser.open(opened[-1].as_uri() if opened else url):  # (a server, a container: none)
                typer.echo("no browser could be started here: open the address above in one", err=True)

    opened: list[Path] = []  # (removed at exit)
    try:
        asyncio.run(serve(address, security_from_env(), host, port, timeout, ready, allow_host or ()))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    finally:
        for path in opened:
            path.unlink(missing_ok=True)


@app.command()
@_handled
def health(server: Server = DEFAULT_SERVER, json_: Json = False, timeout: Timeout = 5.0) -> None:
    """Ask the server's gRPC health service; exit 1 unless it is SERVING."""
    state = _with_client(server, timeout, lambda ps: ps.health())
    if json_:
        _print_json({"server": server, "status": state, "time": time.time()})
    else:
        typer.echo(state)
    if state != "SERVING":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
