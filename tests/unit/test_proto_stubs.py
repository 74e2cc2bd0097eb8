"""The committed stubs are exactly what the pinned generator makes of the .proto, and the
contract passes `buf lint` (STANDARD rules, buf.yaml at the repository root)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
STUBS = [f"{name}{ext}" for name in ("paramserver_pb2", "cluster_pb2") for ext in (".py", ".pyi", "_grpc.py")]


def _generate_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_protos_generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    protos = _generate_module().generate(out)
    assert [p.name for p in protos] == ["cluster.proto", "paramserver.proto"]
    return out / "paramserver" / "v1"


@pytest.mark.parametrize("name", STUBS)
def test_committed_stub_is_up_to_date(generated: Path, name: str) -> None:
    fresh = generated / name
    committed = PROTOS / "paramserver" / "v1" / name
    assert fresh.is_file(), f"the generator did not write {name}"
    assert committed.is_file(), f"{committed} is missing: run `python protos/generate.py`"
    assert fresh.read_bytes() == committed.read_bytes(), (
        f"{committed.relative_to(ROOT)} differs from the generator's output: "
        "run `python protos/generate.py` and commit the result"
    )


def _buf() -> Path:
    candidates = [Path(sys.executable).parent / "buf", ROOT / ".venv" / "bin" / "buf"]
    found = shutil.which("buf")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file():
            return c
    pytest.fail(
        "the `buf` binary is missing (looked in "
        + ", ".join(str(c) for c in candidates)
        + "): install the test extras, `pip install -e '.[test]'` (package buf-bin)"
    )


def test_buf_lint() -> None:
    buf = _buf()
    proc = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, f"`buf lint` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
