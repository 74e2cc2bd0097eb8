"""deploy/k8s/*.yaml against the Kubernetes schemas (kubernetes-validate, strict), and wired together:
the StatefulSet's N replicas are the N servers of PS_CLUSTER, named by its headless Service, each
pod's index its ordinal (ps-server's own config parser, fed the manifest's environment and each
pod's host name, says so); workers and psctl reach server 0.

kubernetes-validate ships the schemas, so this needs no cluster and no network. It is a test
dependency: missing, these tests fail (they never skip).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sizing import server_peak, worker_peak

from ps_server.config import FROM_HOSTNAME, parse_config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
GRPC_PORT = 50051
POD_NAME = "statefulset.kubernetes.io/pod-name"  # the label the StatefulSet controller sets on each pod
# native gRPC probes are GA from 1.27: check the oldest version they need and the newest the package knows
VERSIONS = ["1.27.0", None]


def _validator() -> Path:
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate (a test dependency)")
    exe = Path(sys.executable).with_name("kubernetes-validate")
    assert exe.exists(), f"{exe} is missing: reinstall kubernetes-validate"
    return exe


def _documents() -> list[dict[str, Any]]:
    import yaml  # kubernetes-validate's dependency

    docs = []
    for path in MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, component: str) -> dict[str, Any]:
    found = [d for d in _documents()
             if d["kind"] == kind and d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} for the {component}, found {len(found)}"
    return found[0]


def _service(name: str) -> dict[str, Any]:
    found = [d for d in _documents() if d["kind"] == "Service" and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one Service {name!r}, found {len(found)}"
    return found[0]


def _server_env() -> dict[str, str]:
    (container,) = _one("StatefulSet", "server")["spec"]["template"]["spec"]["containers"]
    assert all("value" in e for e in container["env"]), "the server's environment should be plain values"
    return {e["name"]: str(e["value"]) for e in container["env"]}


def _selects_server_0(service: dict[str, Any]) -> bool:
    """``service`` selects the StatefulSet's pod 0 and no other."""
    sts = _one("StatefulSet", "server")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    selector = dict(service["spec"]["selector"])
    return selector.pop(POD_NAME, None) == f"{sts['metadata']['name']}-0" and selector.items() <= labels.items()


def test_there_are_manifests() -> None:
    assert {p.name for p in MANIFESTS} >= {"server.yaml", "workers.yaml"}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "latest")
def test_manifests_validate_strictly_against_the_kubernetes_schemas(version: str | None) -> None:
    exe = _validator()
    args = [str(exe), "--strict", *(["--kubernetes-version", version] if version else []), *map(str, MANIFESTS)]
    got = subprocess.run(args, capture_output=True, text=True, timeout=120)
    output = got.stdout + got.stderr
    assert got.returncode == 0, output
    assert "ERROR" not in output, output
    # every document was checked (none passed unnoticed as an unknown kind)
    assert output.count("passed for resource") == len(_documents()), output


def test_server_statefulset_has_grpc_probes_a_volume_and_a_service() -> None:
    _validator()
    sts = _one("StatefulSet", "server")
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == GRPC_PORT, probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PS_HOST"] == "0.0.0.0" and env["PS_PORT"] == str(GRPC_PORT)
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {env["PS_DATA_DIR"]}
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(env["PS_GRACE_SECONDS"])

    services = [d for d in _documents() if d["kind"] == "Service"]
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for svc in services:  # the server's pods, or one of them (by the label the StatefulSet sets)
        selector = {k: v for k, v in svc["spec"]["selector"].items() if k != POD_NAME}
        assert selector.items() <= pod["metadata"]["labels"].items(), svc["metadata"]["name"]
        if POD_NAME in svc["spec"]["selector"]:
            assert svc["spec"]["selector"][POD_NAME] in {f"{sts['metadata']['name']}-{i}"
                                                         for i in range(sts["spec"]["replicas"])}


def test_the_replicas_are_the_servers_of_the_cluster_each_named_by_the_headless_service() -> None:
    _validator()
    sts = _one("StatefulSet", "server")
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    assert replicas >= 2, "two servers by default, as docker-compose.yml"
    assert sts["spec"].get("podManagementPolicy") == "Parallel", "servers should start together, not one by one"
    pod = sts["spec"]["template"]

    # The governing Service is headless: it gives pod i the DNS name NAME-i.HEADLESS, before it is ready.
    headless = _service(sts["spec"]["serviceName"])
    assert headless["spec"].get("clusterIP") == "None"
    assert headless["spec"].get("publishNotReadyAddresses") is True, "servers must find each other while starting"
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    # PS_CLUSTER names exactly the replicas, in ordinal order, by those names.
    env = _server_env()
    peers = env["PS_CLUSTER"].split(",")
    expected = [f"{name}-{i}.{headless['metadata']['name']}:{GRPC_PORT}" for i in range(replicas)]
    assert peers == expected, f"replicas: {replicas} needs PS_CLUSTER={','.join(expected)}"
    data_port = int(env["PS_DATA_PORT"])
    assert {"name": "data", "port": data_port, "targetPort": "data"} in headless["spec"]["ports"]
    assert {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "grpc"} in headless["spec"]["ports"]

    # Each pod derives its index from its host name (its pod name), as ps-server parses it.
    assert env["PS_INDEX"] == FROM_HOSTNAME
    assert pod["spec"].get("hostname") is None and pod["spec"].get("setHostnameAsFQDN") is not True
    for i in range(replicas):
        config = parse_config([], env, hostname=f"{name}-{i}")
        assert (config.index, config.peers, config.port, config.data_port) == (i, expected, GRPC_PORT, data_port)
    # one replica more than the list: that pod refuses to start (rather than join as a stranger)
    with pytest.raises(SystemExit):
        parse_config([], env, hostname=f"{name}-{replicas}")


def test_workers_reach_the_server_through_its_service() -> None:
    _validator()
    deploy = _one("Deployment", "worker")
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    host, _, port = env["PS_SERVER"].partition(":")
    service = _service(host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"].get("clusterIP") != "None", "workers should use the ClusterIP service"
    # server 0 owns membership: workers join there (another server would forward every call to it)
    assert _selects_server_0(service), f"the Service {host} should select server 0 only"
    # The TCP data plane: workers dial the service's host at the port Join tells, so the server's
    # data port must be fixed and exposed by the same service under the same number.
    server = _one("StatefulSet", "server")["spec"]["template"]["spec"]["containers"][0]
    data_port = int({e["name"]: e.get("value") for e in server["env"]}["PS_DATA_PORT"])
    assert {"name": "data", "containerPort": data_port} in server["ports"]
    assert {"name": "data", "port": data_port, "targetPort": "data"} in service["spec"]["ports"]
    assert container["image"] == _one("StatefulSet", "server")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the worker's selector must not also select the server's pods (and the other way round)
    server_labels = _one("StatefulSet", "server")["spec"]["template"]["metadata"]["labels"]
    assert not deploy["spec"]["selector"]["matchLabels"].items() <= server_labels.items()


def test_psctl_is_told_to_reach_server_0() -> None:
    """The port-forward the manifests' comments give psctl goes to server 0's Service."""
    text = (K8S / "server.yaml").read_text()
    targets = re.findall(r"kubectl port-forward .*?svc/([\w-]+) (\d+):(\d+)", text)
    assert targets, "server.yaml should say how psctl reaches the cluster"
    for name, _, port in targets:
        service = _service(name)
        assert _selects_server_0(service) and int(port) in [p["port"] for p in service["spec"]["ports"]]


_QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "": 1}


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes these manifests use)."""
    number, suffix = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _QUANTITY[suffix]


def test_the_runs_a_server_accepts_fit_its_memory_limit() -> None:
    """Runs the server accepts must not get it OOM-killed: that ends every run it holds, and the
    restarted server resumes the same runs and is killed again (CrashLoopBackOff). The server's
    --max-param-bytes (PS_MAX_PARAM_BYTES) and --max-total-bytes (PS_MAX_TOTAL_BYTES) are what
    refuse a run too large, by name, so they are set to fit the container's limit: every run held
    (parameters, optimizer state, BSP's held gradients), a gradient being received (one push slot)
    and a checkpoint's copy of the largest run, plus the process. Its memory request is as much: a
    node short of memory evicts (and its kernel OOM-kills) first the pods past their request, and
    at 512Mi that was the server, holding every run."""
    _validator()
    (container,) = _one("StatefulSet", "server")["spec"]["template"]["spec"]["containers"]
    limit = _bytes(container["resources"]["limits"]["memory"])
    request = _bytes(container["resources"]["requests"]["memory"])
    config = parse_config([], _server_env(), hostname="paramserver-0")
    assert config.push_slots == 1 and config.max_total_bytes > 0, "set PS_MAX_TOTAL_BYTES to fit the limit"
    needed = server_peak(config, limit)
    assert needed <= limit, (f"runs of --max-total-bytes {config.max_total_bytes}, the largest of --max-param-bytes "
                             f"{config.max_param_bytes}, need ~{needed >> 20} MiB: set PS_MAX_TOTAL_BYTES and "
                             f"PS_MAX_PARAM_BYTES to fit the memory limit of {limit >> 20} MiB, or raise it")
    assert config.max_total_bytes >= 3 * config.max_param_bytes, "the largest run with Adam should fit the total"
    assert needed <= request <= limit, (f"the server's memory request ({request >> 20} MiB) should be what its runs "
                                        f"may take it to (~{needed >> 20} MiB), within its limit ({limit >> 20} MiB)")


def test_a_worker_can_train_the_largest_run_the_servers_accept() -> None:
    """A worker OOM-killed by its model is restarted, takes the rank again and is killed again:
    its limit fits the largest run every server's PS_MAX_PARAM_BYTES lets through (measured: ~120
    MiB + 2x the model), and its request what the wide MLP measured takes."""
    _validator()
    (worker,) = _one("Deployment", "worker")["spec"]["template"]["spec"]["containers"]
    servers = _one("StatefulSet", "server")["spec"]["replicas"]
    config = parse_config([], _server_env(), hostname="paramserver-0")
    limit = _bytes(worker["resources"]["limits"]["memory"])
    assert worker_peak(servers, config.max_param_bytes) <= limit, (
        f"a worker of {servers} servers' largest run needs ~{worker_peak(servers, config.max_param_bytes) >> 20} "
        f"MiB, over its limit of {limit >> 20} MiB")
    assert _bytes(worker["resources"]["requests"]["memory"]) >= 185 << 20  # the wide MLP's worker


def test_a_server_resuming_its_runs_is_not_restarted_by_its_startup_probe() -> None:
    """Loading every run of its volume (~3.5 s per GB) takes a server minutes with many runs: a
    startup probe that gives up sooner restarts it, and it starts loading again, for ever."""
    _validator()
    (container,) = _one("StatefulSet", "server")["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, probe
