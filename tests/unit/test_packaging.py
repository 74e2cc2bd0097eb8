"""The wheel holds every package of the source tree (the Docker image installs the wheel, not the tree)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_in_the_wheel() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in ("ps_server", "worker", "client", "paramserver")
             for p in (ROOT / top).rglob("__init__.py") if "node_modules" not in p.parts}
    found.add("paramserver.v1")  # from protos/, by package-dir
    assert listed == found
    assert tool["package-dir"]["paramserver.v1"] == "protos/paramserver/v1"
