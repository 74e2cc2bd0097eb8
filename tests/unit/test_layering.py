"""The layout is the architecture: the core never loads gRPC or the generated stubs (STYLE.md 1).

Each check runs in a fresh interpreter, because this test process has long imported grpc.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

CORE = [
    "ps_server.errors",
    "ps_server.spec",
    "ps_server.store",
    "ps_server.optimizers",
    "ps_server.gate",
    "ps_server.status",
    "ps_server.run",
    "ps_server.registry",
    "ps_server.config",
]

_PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
bad = sorted(m for m in sys.modules if m == "grpc" or m.startswith("grpc.") or m.startswith("grpc_")
             or m.endswith("_pb2") or m.endswith("_pb2_grpc"))
print(json.dumps(bad))
"""


def _loaded_transport_modules(modules: list[str]) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE.format(modules=modules)],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr}"
    result: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_probe_detects_grpc() -> None:
    """The check can fail: importing a transport module is reported."""
    bad = _loaded_transport_modules(["ps_server.codec"])
    assert "grpc" in bad
    assert any(m.endswith("_pb2") for m in bad)


def test_core_imports_without_grpc() -> None:
    bad = _loaded_transport_modules(CORE)
    assert bad == [], f"core modules pulled in transport modules: {bad}"


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_alone(module: str) -> None:
    assert _loaded_transport_modules([module]) == []


@pytest.mark.parametrize("module", ["worker.models", "worker.datasets"])
def test_worker_compute_modules_import_without_grpc(module: str) -> None:
    assert _loaded_transport_modules([module]) == []
