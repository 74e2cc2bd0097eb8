"""Every benchmark script still imports what it uses and parses its arguments (``--help``).

The benchmarks are not run in CI (their figures need a quiet machine), so this is what keeps a
refactoring of the code they import from breaking them unnoticed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_starts(script: str) -> None:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
