"""ps-server --index from-hostname (PS_INDEX=from-hostname): a StatefulSet pod's ordinal as its index."""

from __future__ import annotations

import pytest

from ps_server.config import FROM_HOSTNAME, index_from_hostname, parse_config

pytestmark = pytest.mark.timeout(30)

CLUSTER = "ps-0.ps-headless:50051,ps-1.ps-headless:50051,ps-2.ps-headless:50051"


@pytest.mark.parametrize(("hostname", "index"), [
    ("paramserver-0", 0), ("paramserver-2", 2), ("paramserver-12", 12), ("ps-1.ps-headless.ns.svc.cluster.local", 1),
    ("a-b-3", 3),
])
def test_the_number_a_host_name_ends_in_is_the_index(hostname: str, index: int) -> None:
    assert index_from_hostname(hostname) == index


@pytest.mark.parametrize("hostname", ["paramserver", "paramserver-", "-1", "paramserver-x1", "paramserver-1a",
                                      "paramserver-\u0661", "ps-1x.ps-headless", "3f2a9c1b7d6e", ""])
def test_a_host_name_without_a_trailing_number_is_refused(hostname: str) -> None:
    with pytest.raises(ValueError, match="does not end in '-' and a number"):
        index_from_hostname(hostname)


def test_the_variable_and_the_flag_take_the_index_from_the_host_name() -> None:
    env = {"PS_CLUSTER": CLUSTER, "PS_INDEX": FROM_HOSTNAME, "PS_PORT": "50051"}
    for i in range(3):
        assert parse_config([], env, hostname=f"ps-{i}").index == i
        assert parse_config(["--cluster", CLUSTER, "--index", FROM_HOSTNAME], {}, hostname=f"ps-{i}").index == i
        assert parse_config([f"--cluster={CLUSTER}", f"--index={FROM_HOSTNAME}"], {}, hostname=f"ps-{i}").index == i


def test_a_flag_wins_over_the_variable_either_way() -> None:
    env = {"PS_CLUSTER": CLUSTER, "PS_INDEX": FROM_HOSTNAME}
    assert parse_config(["--index", "1"], env, hostname="not-a-pod").index == 1
    assert parse_config(["--index", FROM_HOSTNAME], {**env, "PS_INDEX": "0"}, hostname="ps-2").index == 2
    assert parse_config(["--index", "0", "--index", FROM_HOSTNAME], env, hostname="ps-2").index == 2
    assert parse_config(["--index", FROM_HOSTNAME, "--index=1"], env, hostname="ps-2").index == 1


def test_numbers_are_unchanged_and_the_host_name_unread() -> None:
    assert parse_config(["--cluster", CLUSTER, "--index", "2"], {}, hostname="").index == 2
    assert parse_config([], {"PS_CLUSTER": CLUSTER, "PS_INDEX": "1"}, hostname="").index == 1
    assert parse_config([], {}, hostname="").index == 0


def test_a_host_name_without_a_number_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config([], {"PS_CLUSTER": CLUSTER, "PS_INDEX": FROM_HOSTNAME}, hostname="3f2a9c1b7d6e")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'3f2a9c1b7d6e'" in err and "--index from-hostname" in err, err


def test_an_ordinal_beyond_the_cluster_says_where_it_came_from(capsys: pytest.CaptureFixture[str]) -> None:
    # a StatefulSet scaled to 4 replicas while PS_CLUSTER still lists 3 servers
    with pytest.raises(SystemExit):
        parse_config([], {"PS_CLUSTER": CLUSTER, "PS_INDEX": FROM_HOSTNAME}, hostname="ps-3")
    err = capsys.readouterr().err
    assert "--index 3 (the number host name 'ps-3' ends in) is not in 0..2 (--cluster has 3 servers)" in err, err


def test_the_help_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(["--help"], {})
    assert FROM_HOSTNAME in capsys.readouterr().out
