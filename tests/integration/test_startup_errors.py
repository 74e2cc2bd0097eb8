"""Every start-up error of ps-server and ps-worker is one line naming the flag, the value and what
to do, with exit status 2: no traceback (issue 14, a newcomer's first hour)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import ENV

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def busy() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and its key."""
    from test_security import _cert, _key, _write

    d, key = tmp_path_factory.mktemp("pem"), _key()
    return _write(d / "cert.pem", _cert("localhost", key, "localhost", key, ca=False)), _write(d / "key.pem", key)


def _start(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    module = {"ps-server": "ps_server.server", "ps-worker": "worker.main"}[program]
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=30)


CASES = {
    "port in use": ("ps-server", ["--port", "{busy}"], ["--port {busy}", "Address already in use", "choose"]),
    "metrics port in use": ("ps-server", ["--port", "0", "--metrics-port", "{busy}"],
                            ["--metrics-port {busy}", "Address already in use", "choose"]),
    "health port in use": ("ps-server", ["--port", "0", "--health-port", "{busy}"],
                           ["--health-port {busy}", "Address already in use", "choose"]),
    "data port in use": ("ps-server", ["--port", "0", "--data-port", "{busy}"],
                         ["--data-port {busy}", "Address already in use", "choose"]),
    "port out of range": ("ps-server", ["--port", "70000"], ["--port 70000", "0..65535"]),
    "unknown host": ("ps-server", ["--host", "nowhere.invalid", "--port", "0"], ["nowhere.invalid", "--host"]),
    "server log level": ("ps-server", ["--log-level", "LOUD"], ["--log-level", "'LOUD'", "INFO"]),
    "worker log level": ("ps-worker", ["--log-level", "LOUD"], ["--log-level", "'LOUD'", "INFO"]),
    "data dir is a file": ("ps-server", ["--port", "0", "--data-dir", "{file}"], ["--data-dir {file}", "not a directory"]),
    "missing certificate": ("ps-server", ["--port", "0", "--tls-cert", "{missing}", "--tls-key", "{missing}"],
                            ["--tls-cert {missing}", "No such file"]),
    "certificate not PEM": ("ps-server", ["--port", "0", "--tls-cert", "{file}", "--tls-key", "{file}"],
                            ["--tls-cert {file}", "--tls-key {file}", "PEM"]),
    "client CA not PEM": ("ps-server", ["--port", "0", "--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca",
                                        "{file}"], ["--tls-client-ca {file}", "PEM"]),
    "missing token file": ("ps-worker", ["--token-file", "{missing}", "--once"], ["--token-file {missing}", "No such file"]),
    "worker timeout": ("ps-worker", ["--timeout-seconds", "0"], ["--timeout-seconds 0", "> 0"]),
    "worker nice": ("ps-worker", ["--nice", "20"], ["--nice 20", "0 (as started) to 19"]),
    "lease and heartbeat": ("ps-server", ["--lease-seconds", "1", "--heartbeat-seconds", "2"],
                            ["--heartbeat-seconds", "--lease-seconds", "shorter"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_start_up_error_is_one_line_and_exit_2(case: str, busy: int, pem: tuple[Path, Path], tmp_path: Path) -> None:
    program, args, says = CASES[case]
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    values = {"busy": busy, "file": file, "missing": tmp_path / "missing.pem", "cert": pem[0], "key": pem[1]}
    result = _start(program, *(a.format(**values) for a in args))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{program}: error: ") and "Traceback" not in result.stderr
    for part in says:
        assert part.format(**values) in lines[0], lines[0]
    assert not file.is_dir() and not result.stdout  # nothing started, nothing changed
