"""The README's SDK example (a worker for your own model) runs as written against a real server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from ps_server.server import PsServer

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.index("## Writing a worker for your own model")
    start = text.index("```python\n", section) + len("```python\n")
    return text[start : text.index("```", start)]


async def test_the_readme_sdk_example_trains_its_model(server: PsServer, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(_example())
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), f"127.0.0.1:{server.port}",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "w = [ 1.  -2.   0.5]"
    (run,) = server.registry.runs()
    assert run.state.value == "completed" and run.counters.pushes_applied == 200


async def test_the_readme_sdk_example_runs_beside_a_waiting_ps_worker(server: PsServer, tmp_path: Path) -> None:
    # The README's order: workers started by hand stay waiting for work; the example's run must
    # not be handed to one of them (a ps-worker cannot train it, and failed it).
    script = tmp_path / "example.py"
    script.write_text(_example())
    address = f"127.0.0.1:{server.port}"
    worker = await asyncio.create_subprocess_exec(sys.executable, "-m", "worker.main", "--server", address,
                                                  "--join-wait-seconds", "1", cwd=README.parent,
                                                  stderr=asyncio.subprocess.PIPE)
    try:
        assert worker.stderr is not None
        async with asyncio.timeout(60):  # it is connected and waiting for work, as in the README
            while b"waiting for work" not in await worker.stderr.readline():
                pass
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), address,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == "w = [ 1.  -2.   0.5]"
        (run,) = server.registry.runs()
        assert run.state.value == "completed"
    finally:
        worker.kill()
        await worker.wait()
