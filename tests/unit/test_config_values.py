"""ps-server's and ps-worker's numbers that cannot work are refused at start, naming the flag:
NaN and infinite times (a NaN lease never expires; a Join then failed with "cannot convert float
NaN to integer") and message sizes beyond gRPC's int32 (a traceback from gRPC before)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ps_server.config import memory_limit, total_budget
from ps_server.config import parse_config as server_config
from worker.config import parse_config as worker_config

pytestmark = pytest.mark.timeout(30)


def _server(args: list[str]) -> object:
    return server_config(args, env={})


def _worker(args: list[str]) -> object:
    return worker_config(["--server", "127.0.0.1:50051", *args], env={})


@pytest.mark.parametrize(("parse", "args", "says"), [
    (_server, ["--lease-seconds", "nan"], "--lease-seconds nan must be a positive number"),
    (_server, ["--heartbeat-seconds", "inf"], "--heartbeat-seconds inf must be a positive number"),
    (_server, ["--shard-timeout", "nan"], "--shard-timeout nan must be a positive number"),
    (_server, ["--grace-seconds", "nan"], "--grace-seconds nan must be a number >= 0"),
    (_server, ["--grace-seconds", "inf"], "--grace-seconds inf must be a number >= 0"),
    (_server, ["--max-message-bytes", "3000000000"], "--max-message-bytes 3000000000 must be in 1..2147483647"),
    (_server, ["--max-total-bytes", "-2"], "--max-total-bytes -2 must be a number of bytes, 0 (half of the memory)"),
    (_worker, ["--timeout-seconds", "nan"], "--timeout-seconds nan: must be a number > 0"),
    (_worker, ["--idle-exit-seconds", "inf"], "--idle-exit-seconds inf: must be a number >= 0"),
    (_worker, ["--max-message-bytes", "3000000000"], "must be at most 2147483647"),
])
def test_times_and_sizes_that_cannot_work_are_refused_naming_the_flag(
        parse: Callable[[list[str]], object], args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(args)
    assert says in capsys.readouterr().err


def test_good_values_still_parse() -> None:
    assert server_config(["--lease-seconds", "3", "--heartbeat-seconds", "1"], env={}).lease_seconds == 3
    assert worker_config(["--server", "h:1", "--timeout-seconds", "2.5"], env={}).timeout_seconds == 2.5


@pytest.mark.parametrize(("value", "means"), [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False),
                                               ("", False), ("ture", None), ("2", None)])
def test_a_yes_or_no_variable_takes_yes_or_no_and_nothing_else(value: str, means: bool | None,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """(A typo such as PS_LOG_JSON=ture meant no, silently.)"""
    if means is None:
        with pytest.raises(SystemExit):
            server_config([], env={"PS_LOG_JSON": value})
        assert f"PS_LOG_JSON={value!r} is not yes or no" in capsys.readouterr().err
    else:
        assert server_config([], env={"PS_LOG_JSON": value}).log_json is means


def test_the_sdk_takes_ps_servers_default_wait_limit_until_a_server_says_its_own() -> None:
    from paramserver.client import SERVER_MAX_WAIT
    from ps_server.config import ServerConfig

    assert ServerConfig().max_wait_seconds == SERVER_MAX_WAIT


def test_the_runs_together_may_take_half_the_memory_the_server_may_use_unless_told() -> None:
    """--max-total-bytes: by default half of the memory limit (the rest is for what it does not
    count: the process, gradients being received, a checkpoint's copies, workers on the host)."""
    limit = lambda: (8 << 30, "the cgroup's memory limit (memory.max)")  # noqa: E731
    assert total_budget(server_config([], env={}), limit) == (
        4 << 30, "half of the cgroup's memory limit (memory.max): --max-total-bytes")
    assert total_budget(server_config(["--max-total-bytes", "1000"], env={}), limit) == (1000, "--max-total-bytes")
    assert total_budget(server_config([], env={"PS_MAX_TOTAL_BYTES": "-1"}), limit)[0] == 0


@pytest.mark.parametrize(("files", "expected"), [
    ({"memory.max": "2147483648\n"}, 2 << 30),  # cgroup v2, a container's limit
    ({"memory.max": "max\n"}, None),  # v2, no limit
    ({"memory/memory.limit_in_bytes": "1073741824\n"}, 1 << 30),  # cgroup v1
    ({"memory/memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1, no limit
    ({}, None),
])
def test_the_memory_a_server_may_use_is_its_cgroups_limit_else_physical_memory(
        tmp_path: Path, files: dict[str, str], expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    physical = memory_limit(str(tmp_path / "none"))
    assert physical[1] == "physical memory" and physical[0] > 0
    got = memory_limit(str(tmp_path))
    assert got == ((expected, f"the cgroup's memory limit ({tmp_path}/{next(iter(files))})") if expected
                   else physical)
