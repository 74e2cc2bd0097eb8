"""The README's configuration table names every variable of ps-server and ps-worker, and no other."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ps_server.config import ServerConfig
from worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(30)

README = Path(__file__).resolve().parents[2] / "README.md"


def _table_variables() -> set[str]:
    text = README.read_text()
    section = text[text.index("## Configuration"):text.index("## The protocol")]
    rows = [line for line in section.splitlines() if line.startswith("| `PS")]
    return {name for row in rows for name in re.findall(r"`(PS\w+)`", row.split("|")[1])}


def _variables(cls: type, env_name: object) -> set[str]:
    return {env_name(f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type, operator]


def test_every_variable_is_in_the_readme_and_every_row_is_a_variable() -> None:
    documented = _table_variables()
    real = _variables(ServerConfig, ServerConfig.env_name) | _variables(WorkerConfig, WorkerConfig.env_name)
    assert real - documented == set(), "add these to the README's configuration table"
    assert documented - real - {"PSCTL_SERVER"} == set(), "the README documents variables that do not exist"
