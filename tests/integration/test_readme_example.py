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
