"""ps-server's and ps-worker's numbers that cannot work are refused at start, naming the flag:
NaN and infinite times (a NaN lease never expires; a Join then failed with "cannot convert float
NaN to integer") and message sizes beyond gRPC's int32 (a traceback from gRPC before)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

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
