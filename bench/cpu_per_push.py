"""CPU per applied push of the server and of the workers, small model, steady state.

    .venv/bin/python bench/cpu_per_push.py [--staleness inf] [--seconds 3] [--psctl] [--profile DIR]

A ps-server and four ps-worker processes (or, with ``--psctl``, ``psctl launch --local``, which
also follows the run) train the digits MLP-64 for 400 epochs. After 2,000 pushes, the server's
and the workers' CPU time (user + system, from /proc) and the applied pushes are read, and again
``--seconds`` later. Prints pushes/s and milliseconds of CPU per applied push for each side: a
figure that, unlike the rate, hardly depends on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.cli import parse_staleness  # noqa: E402
from client.spec import LaunchOptions, build_run_spec  # noqa: E402
from paramserver.client import PsClient  # noqa: E402

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
WORKERS = 4


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def profile(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy of ``pid`` for ``seconds`` (samples only while it holds the GIL), folded stacks in ``out``."""
    spy = str(Path(sys.executable).with_name("py-spy"))  # installed in the venv with the test extras
    return subprocess.Popen([spy, "record", "--gil", "--rate", "200", "-p", str(pid), "-d", str(int(seconds + 1)),
                             "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(address: str, server: int, workers: list[int], seconds: float, prof: Path | None = None) -> str:
    async with PsClient(address) as c:
        while not (runs := await c.list_runs()):
            await asyncio.sleep(0.1)
        run_id = runs[0].run_id
        while (await c.get_run(run_id)).counters.pushes_applied < 2000:
            await asyncio.sleep(0.2)
        a0, s0, w0, t0 = ((await c.get_run(run_id)).counters.pushes_applied, cpu(server),
                          sum(cpu(w) for w in workers), time.monotonic())
        spies = [profile(pid, seconds, prof / f"{who}.txt") for who, pid in (("server", server), ("worker", workers[0]))] if prof else []
        await asyncio.sleep(seconds)
        a1, s1, w1, t1 = ((await c.get_run(run_id)).counters.pushes_applied, cpu(server),
                          sum(cpu(w) for w in workers), time.monotonic())
        await c.stop_run(run_id, "measured")
    for spy in spies:
        spy.wait()
    n = a1 - a0
    return (f"{n / (t1 - t0):,.0f} pushes/s; CPU per applied push: server {1e3 * (s1 - s0) / n:.3f} ms, "
            f"{len(workers)} workers together {1e3 * (w1 - w0) / n:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--staleness", default="inf")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--psctl", action="store_true", help="through psctl launch --local (which follows the run)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record py-spy of the server and one worker during the window into DIR (skews the figures)")
    args = ap.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        if args.psctl:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "client.cli", "launch", "--local", "--workers", str(WORKERS), "--model",
                 "mlp:64", "--dataset", "digits", "--staleness", args.staleness, "--epochs", "400"],
                cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(launcher)
            assert launcher.stdout is not None
            line = ""
            while "local ps-server" not in line:
                line = launcher.stdout.readline()
                assert line, "psctl ended before it started a server"
            address = re.search(r"\((\S+)\)", line).group(1)  # type: ignore[union-attr]
            deadline = time.monotonic() + 30
            while len(pids("worker.main")) < WORKERS and time.monotonic() < deadline:
                time.sleep(0.1)
            server, workers = pids("ps_server.server")[0], pids("worker.main")
        else:
            srv = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--log-level", "WARNING"],
                                   cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
            procs.append(srv)
            assert srv.stdout is not None
            m = re.search(r"listening on (\S+:\d+)", srv.stdout.readline())
            assert m, "the server did not start"
            address, server = m.group(1), srv.pid
            ws = [subprocess.Popen([sys.executable, "-m", "worker.main", "--server", address, "--once",
                                    "--log-level", "ERROR"], cwd=ROOT, env=ENV) for _ in range(WORKERS)]
            procs += ws  # type: ignore[arg-type]
            workers = [w.pid for w in ws]

            async def create() -> None:
                async with PsClient(address) as c:
                    await c.create_run(build_run_spec(LaunchOptions(
                        model="mlp:64", dataset="digits", workers=WORKERS, staleness=parse_staleness(args.staleness), epochs=400)))

            asyncio.run(create())
        print(("psctl launch --local: " if args.psctl else "ps-server + 4 ps-worker: ")
              + asyncio.run(measure(address, server, workers, args.seconds, args.profile)))
    finally:
        # the workers (and psctl) end with the stopped run; a hand-started server is stopped here
        for p in reversed(procs):
            if p is procs[0] and not args.psctl:
                p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
