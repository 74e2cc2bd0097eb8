"""The layout is the architecture: the core never loads gRPC or the generated stubs (STYLE.md 1).

Each check runs in a fresh interpreter, because this test process has long imported grpc.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

CORE = sorted(f"ps_server.core.{p.stem}" for p in (ROOT / "ps_server" / "core").glob("*.py")
              if p.stem != "__init__") + ["ps_server.config"]

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
    bad = _loaded_transport_modules(["ps_server.servicer"])
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


# ------------------------------------------------------------------------------ who may import gRPC
GRPC_MODULES = {
    # the server's gRPC leaf and its wiring
    "ps_server/servicer.py", "ps_server/security.py", "ps_server/server.py",
    # the links between the servers of a cluster
    "ps_server/cluster/peers.py",
    # the SDK's gRPC transport
    "paramserver/grpc_transport.py",
}
"""The only hand-written modules that import grpc (or its health/reflection packages, or the
generated ``*_pb2_grpc`` stubs): transports. The core, the transport-neutral services, the SDK's
facade and the programs above it (worker, psctl) do not."""

SOURCES = [p for folder in ("ps_server", "paramserver", "worker", "client", "protos/paramserver")
           for p in sorted((ROOT / folder).rglob("*.py")) if "_pb2" not in p.name]


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:  # relative: our own
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _imports_grpc(source: str) -> bool:
    return any(n == "grpc" or n.startswith(("grpc.", "grpc_")) or n.endswith("_pb2_grpc") for n in _imports(source))


def test_only_transport_modules_import_grpc() -> None:
    importers = {str(p.relative_to(ROOT)) for p in SOURCES if _imports_grpc(p.read_text())}
    assert importers == GRPC_MODULES


def test_the_grpc_import_check_can_fail() -> None:
    """The check above sees every form of import, here in a trainer that would break the rule."""
    for line in ("import grpc", "from grpc import aio", "import grpc.aio as g", "from grpc_health.v1 import health",
                 "from paramserver.v1 import paramserver_pb2_grpc as pb_grpc"):
        assert _imports_grpc(f"import numpy\n{line}\n"), line
    assert not _imports_grpc("from paramserver import errors\nimport numpy as np\n")


# ------------------------------------------------------------------------------ facts, not prose
CLIENT_PYTHON = [p for folder in ("paramserver", "worker", "client") for p in sorted((ROOT / folder).rglob("*.py"))]
CLIENT_JS = sorted((ROOT / "worker" / "node" / "src").glob("*.js"))
_TEXT = ("message", "details")


def _is_text(node: ast.AST) -> bool:
    """An error's text: ``x.message``, ``x.details``, ``x.details()``, ``str(exc)``."""
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id == "str":
            return any(isinstance(a, ast.Name) and a.id in ("e", "exc", "err", "error") for a in node.args)
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr in _TEXT


def _python_text_matches(source: str) -> list[int]:
    """Lines that branch on an error's text: compare it, search in it, match it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_is_text(n) for n in (node.left, *node.comparators)):
            if not all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops):
                found.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("startswith", "endswith", "find", "index", "count") and _is_text(node.func.value):
                found.append(node.lineno)
            if node.func.attr in ("search", "match", "fullmatch", "findall") and any(_is_text(a) for a in node.args):
                found.append(node.lineno)
    return found


_JS_TEXT = re.compile(r"\.(?:message|details)\s*(?:\.\s*(?:includes|indexOf|startsWith|endsWith|match|search)\s*\(|[!=]==?)"
                      r"|\.(?:test|exec)\s*\([^)]*\.(?:message|details)\b")


def test_no_client_branches_on_an_error_s_text() -> None:
    """Workers (Python and Node), psctl and the SDK decide on an error's class, code and reason
    (``ErrorInfo``), never on its message: the server's wording may change."""
    python = {str(p.relative_to(ROOT)): lines for p in CLIENT_PYTHON if (lines := _python_text_matches(p.read_text()))}
    js = {str(p.relative_to(ROOT)): [i for i, line in enumerate(p.read_text().splitlines(), 1) if _JS_TEXT.search(line)]
          for p in CLIENT_JS}
    assert python == {} and {f: lines for f, lines in js.items() if lines} == {}


def test_the_text_check_can_fail() -> None:
    for snippet in ('if "next clock is" in exc.details:\n    pass', 'ok = exc.message == "stale"',
                    'if exc.details().startswith("no update"):\n    pass', 'm = re.search("clock (\\\\d+)", exc.message)',
                    'if "stale" in str(exc):\n    pass'):
        assert _python_text_matches(snippet), snippet
    assert not _python_text_matches('log.info("failed: %s", exc.message)\nif exc.reason == 8:\n    pass')
    for line in ("if (e.details.includes('next clock is')) resync();", "if (err.message === 'stale') x();",
                 "if (/clock/.test(e.details)) y();"):
        assert _JS_TEXT.search(line), line
    assert not _JS_TEXT.search("log.info(`failed: ${e.message}`);")


# ------------------------------------------------------------------------------ cancellation
PRODUCTION = [p for folder in ("ps_server", "paramserver", "worker", "client") for p in sorted((ROOT / folder).rglob("*.py"))]


def _wait_for_calls(source: str) -> list[int]:
    """Lines that call ``asyncio.wait_for`` (or a bare ``wait_for`` imported from asyncio)."""
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "wait_for"
         and isinstance(node.func.value, ast.Name) and node.func.value.id == "asyncio")
        or (isinstance(node.func, ast.Name) and node.func.id == "wait_for"))]


def test_no_asyncio_wait_for_in_the_product() -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the result, swallowing the cancellation, when the
    task is cancelled as the awaited call completes (gh-86296, fixed in 3.12): psctl launch --local
    then trained on after Ctrl-C (wait_ready) and the fresh-clone CI caught it. ``asyncio.timeout``
    has no such race."""
    found = {str(p.relative_to(ROOT)): lines for p in PRODUCTION if (lines := _wait_for_calls(p.read_text()))}
    assert found == {}


def test_the_wait_for_check_can_fail() -> None:
    assert _wait_for_calls("import asyncio\nasync def f(x):\n    await asyncio.wait_for(x, 1)\n") == [3]
    assert _wait_for_calls("from asyncio import wait_for\nasync def f(x):\n    await wait_for(x, 1)\n") == [3]
    assert not _wait_for_calls("import asyncio\nasync def f(x):\n    async with asyncio.timeout(1):\n        await x\n")
