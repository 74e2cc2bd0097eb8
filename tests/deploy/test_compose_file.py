"""docker-compose.yml read as data (no Docker): its parameter servers are one cluster, as ps-server
parses each one's environment; workers and psctl reach server 0; the one-server override and the
commented third server give consistent clusters too. tests/docker runs the file for real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sizing import server_peak, worker_peak

from ps_server.config import parse_config

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ONE_SERVER = ROOT / "deploy" / "compose.one-server.yml"


def _load(text: str) -> dict[str, Any]:
    import yaml  # kubernetes-validate's dependency, as in test_k8s_manifests

    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def _env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment as the container gets it (``${VAR:-default}`` at its default)."""
    return {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in service.get("environment", {}).items()}


def _servers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The parameter servers that `up` starts (no profile), by service name."""
    return {name: s for name, s in doc["services"].items() if s.get("command") == ["ps-server"] and not s.get("profiles")}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Compose's merge, as far as these files need: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_cluster(doc: dict[str, Any]) -> list[str]:
    """Every started server has the same PS_CLUSTER, which lists them all in PS_INDEX order, and
    ps-server accepts each one's environment as that place in that cluster; returns the list."""
    servers = _servers(doc)
    lists = {name: _env(s).get("PS_CLUSTER", "") for name, s in servers.items()}
    assert len(set(lists.values())) == 1, f"the servers disagree on PS_CLUSTER: {lists}"
    peers = [a for a in next(iter(lists.values())).split(",") if a]
    by_index = {int(_env(s).get("PS_INDEX", "0")): name for name, s in servers.items()}
    assert sorted(by_index) == list(range(len(servers))), f"PS_INDEX should be 0..{len(servers) - 1}: {by_index}"
    if len(servers) > 1:
        assert peers == [f"{by_index[i]}:{_env(servers[by_index[i]])['PS_PORT']}" for i in range(len(servers))], (
            "PS_CLUSTER should name every server service, as host:PS_PORT, in PS_INDEX order")
    for name, service in servers.items():
        config = parse_config([], _env(service), hostname="unused")
        assert (config.index, config.peers) == (int(_env(service).get("PS_INDEX", "0")), peers), name
        assert config.data_port > 0, f"{name}: a fixed PS_DATA_PORT (workers are told it; 0 would be any port)"
        assert config.data_dir, f"{name}: checkpoints need PS_DATA_DIR"
    # each server checkpoints to a volume of its own, declared at the end
    mounts = {name: [v.split(":")[0] for v in s.get("volumes", []) if v.split(":")[1] == _env(s)["PS_DATA_DIR"]]
              for name, s in servers.items()}
    assert all(len(m) == 1 for m in mounts.values()), mounts
    volumes = [m[0] for m in mounts.values()]
    assert len(set(volumes)) == len(volumes), f"servers share a checkpoint volume: {mounts}"
    assert set(volumes) <= set(doc.get("volumes") or {}), "declare each server's volume under volumes:"
    return peers


def test_two_servers_are_one_cluster_and_workers_and_psctl_reach_server_0() -> None:
    doc = _load(COMPOSE.read_text())
    servers = _servers(doc)
    assert len(servers) == 2
    peers = _check_cluster(doc)
    assert peers[0] == "ps:50051", "server 0 keeps the service name ps (existing commands use it)"
    services = doc["services"]
    assert _env(services["worker"])["PS_SERVER"] == peers[0]
    assert _env(services["client"])["PSCTL_SERVER"] == peers[0]
    for name in ("worker", "client"):  # only on server 0: the one-server override drops the others
        assert set(services[name]["depends_on"]) == {"ps"}, name
    assert [name for name, s in servers.items() if s.get("ports")] == ["ps"], "only server 0 is published"
    for name, s in servers.items():
        assert s["healthcheck"]["test"] and s.get("init") is True, name


def test_the_one_server_override_leaves_server_0_alone() -> None:
    doc = _merge(_load(COMPOSE.read_text()), _load(ONE_SERVER.read_text()))
    assert list(_servers(doc)) == ["ps"]
    assert _check_cluster(doc) == []
    assert parse_config([], _env(doc["services"]["ps"]), hostname="unused").peers == []


def test_the_commented_third_server_makes_a_cluster_of_three() -> None:
    """What the file's comment says to do for a third server, done."""
    text = COMPOSE.read_text()
    block = re.search(r"\n  # ps-2:\n(?:  #.*\n)+", text)
    assert block, "docker-compose.yml should keep a commented ps-2 block to copy"
    uncommented = "\n" + "\n".join("  " + line[4:] for line in block.group(0).strip("\n").splitlines()) + "\n"
    text = text.replace(block.group(0), uncommented)
    text = text.replace("PS_CLUSTER: ps:50051,ps-1:50051", "PS_CLUSTER: ps:50051,ps-1:50051,ps-2:50051")
    text = text.rstrip("\n") + "\n  ps-2-data:\n"
    assert "mem_limit 4g for three servers" in text  # and what the workers need for a third share
    worker = re.search(r"\n  worker:\n(?:    .*\n|\s*\n)+", text)
    assert worker and "    mem_limit: 3g\n" in worker.group(0)
    text = text.replace(worker.group(0), worker.group(0).replace("    mem_limit: 3g\n", "    mem_limit: 4g\n"))
    doc = _load(text)
    assert _check_cluster(doc) == ["ps:50051", "ps-1:50051", "ps-2:50051"]
    largest = sum(parse_config([], _env(s), hostname="unused").max_param_bytes for s in _servers(doc).values())
    assert worker_peak(1, largest) <= _compose_bytes(doc["services"]["worker"]["mem_limit"])


def _seconds(text: str) -> float:
    """A compose duration ('30s', '5m', '1m30s') in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_a_server_resuming_its_runs_is_not_declared_unhealthy() -> None:
    """A server answers its health check once it has loaded every run in its data directory (~3.5 s
    per GB here: a 4 GiB run with Adam is ~45 s, and several runs add up). Declared unhealthy
    before that, `up` gives up on the workers that wait for it (service_healthy): so the servers
    get 5 minutes to start (a fast start is healthy at its first check all the same)."""
    for name, service in _servers(_load(COMPOSE.read_text())).items():
        check = service["healthcheck"]
        window = _seconds(check["start_period"]) + _seconds(check["interval"]) * int(check["retries"])
        assert window >= 300, f"{name}: a starting server is unhealthy after {window:.0f}s"


_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _compose_bytes(value: object) -> int:
    """A compose byte value ('4g', '512m', or a number of bytes) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)", str(value).lower()).groups()  # type: ignore[union-attr]
    return int(number) * _UNITS[unit or "b"]


@pytest.mark.parametrize("override", [False, True], ids=["two-servers", "one-server"])
def test_servers_and_workers_have_memory_limits_their_runs_fit(override: bool) -> None:
    """Without limits one container (a server holding many runs, a worker given a large model) could
    take the host down with every other; with them, a run the servers accept must fit: the
    servers' PS_MAX_TOTAL_BYTES and PS_MAX_PARAM_BYTES within their mem_limit (an OOM-killed
    server loses every run since its checkpoint, and is killed again resuming them), a worker's
    mem_limit above what the largest of those runs takes it (measured). Limits are mem_limit and
    cpus: docker-compose 1.29 ignores deploy.resources (without --compatibility)."""
    doc = _load(COMPOSE.read_text())
    if override:
        doc = _merge(doc, _load(ONE_SERVER.read_text()))
    servers = _servers(doc)
    largest = 0
    for name, service in servers.items():
        config = parse_config([], _env(service), hostname="unused")
        limit = _compose_bytes(service["mem_limit"])
        assert config.max_total_bytes > 0, f"{name}: set PS_MAX_TOTAL_BYTES to fit its mem_limit"
        assert server_peak(config, limit) <= limit, (
            f"{name}: its runs may take it to ~{server_peak(config, limit) >> 20} MiB, over its mem_limit "
            f"{limit >> 20} MiB: lower PS_MAX_TOTAL_BYTES or PS_MAX_PARAM_BYTES, or raise mem_limit")
        largest += config.max_param_bytes
    worker = doc["services"]["worker"]
    limit = _compose_bytes(worker["mem_limit"])
    assert worker_peak(1, largest) <= limit, f"a worker of the largest run ({largest >> 20} MiB) needs more"
    assert float(worker["cpus"]) >= 1, "a worker computes on one whole CPU"
    assert all("deploy" not in s for s in doc["services"].values()), "use mem_limit/cpus (docker-compose 1.29)"


def test_the_dashboard_answers_only_the_names_it_is_published_under() -> None:
    """The dashboard listens on 0.0.0.0 in its container (to be published at all), and answered
    every name there: a web page whose name was pointed at 127.0.0.1 (DNS rebinding) read the runs
    and stopped them through the port published on the host. Its command names what it answers
    to, as psctl parses it."""
    from typer.main import get_command

    from client.cli import app

    command = _load(COMPOSE.read_text())["services"]["dashboard"]["command"]
    assert command[:2] == ["psctl", "dashboard"]
    args = [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", a) for a in command[2:]]
    params = get_command(app).commands["dashboard"].make_context("dashboard", args).params  # type: ignore[attr-defined]
    assert params["host"] == "0.0.0.0" and params["allow_host"], params
