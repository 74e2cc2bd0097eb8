"""deploy/k8s/*.yaml against the Kubernetes schemas (kubernetes-validate, strict), and wired together.

kubernetes-validate ships the schemas, so this needs no cluster and no network. It is a test
dependency: missing, these tests fail (they never skip).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
GRPC_PORT = 50051
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
    assert sts["spec"]["replicas"] == 1
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
    for svc in services:
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), svc["metadata"]["name"]


def test_workers_reach_the_server_through_its_service() -> None:
    _validator()
    deploy = _one("Deployment", "worker")
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    host, _, port = env["PS_SERVER"].partition(":")
    service = next(d for d in _documents() if d["kind"] == "Service" and d["metadata"]["name"] == host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"].get("clusterIP") != "None", "workers should use the ClusterIP service"
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
