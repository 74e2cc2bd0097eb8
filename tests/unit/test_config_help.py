"""ps-server --help and ps-worker --help list every variable of the README's configuration table,
each flag with its default: the yes-or-no flags too, and the variables that have no flag (the token)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest

from ps_server.config import ServerConfig
from ps_server.config import parse_config as server_config
from worker.config import WorkerConfig
from worker.config import parse_config as worker_config

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(("parse", "cls"), [(server_config, ServerConfig), (worker_config, WorkerConfig)])
def test_the_help_names_every_variable_and_every_flags_default(
        parse: Callable[..., object], cls: type, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--help"], {})
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for f in dataclasses.fields(cls):
        var = cls.env_name(f.name)  # type: ignore[attr-defined]
        assert f"{var}" in text, f"{var} is not in the help"
        if not f.metadata.get("env_only"):
            assert re.search(rf"\[{var}\] \(default: ", text), f"{var}'s flag does not say its default"
    assert "[PS_SHM] (default: true)" in text or "[PS_WORKER_SHM] (default: true)" in text
    assert "(default: )" not in text  # (an empty default said nothing: --data-dir, --cluster, --tls-cert, --name...)
    assert text.count("(default: ") == sum(1 for f in dataclasses.fields(cls) if not f.metadata.get("env_only"))
