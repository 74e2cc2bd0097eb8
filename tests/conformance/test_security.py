"""A worker talks to a secured server: mutual TLS and a bearer token (PS_TOKEN), like the Python worker.

On a cluster every server is secured alike (they call each other with their own certificate and
the token): the worker's calls to each shard carry its certificate and the token too, over gRPC (a
secured server offers no TCP data plane, whose framing carries neither)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from paramserver.security import Security
from paramserver.v1 import paramserver_pb2 as pb

from .conftest import Impl, Topology, connect, finish, ps_servers, run_spec

pytestmark = pytest.mark.timeout(90)

TOKEN = "conformance-token"


def _issue(path: Path, name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *,
           ca: bool) -> tuple[x509.Name, ec.EllipticCurvePrivateKey]:
    """Write NAME.pem and NAME.key under ``path``, signed by ``issuer`` (self-signed when None)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (path / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (path / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return subject, key


async def test_trains_against_a_server_with_mutual_tls_and_a_token(impl: Impl, topology: Topology,
                                                                   tmp_path: Path) -> None:
    ca = _issue(tmp_path, "ca", None, ca=True)
    _issue(tmp_path, "server", ca, ca=False)
    _issue(tmp_path, "client", ca, ca=False)
    pem = {n: str(tmp_path / f"{n}.pem") for n in ("ca", "server", "client")}
    tls = ("--tls-ca", pem["ca"], "--tls-cert", pem["client"], "--tls-key", str(tmp_path / "client.key"))
    with topology.start("--tls-cert", pem["server"], "--tls-key", str(tmp_path / "server.key"),
                        "--tls-client-ca", pem["ca"], env={"PS_TOKEN": TOKEN}) as srv:
        me = Security(ca=pem["ca"], cert=pem["client"], key=str(tmp_path / "client.key"), token=TOKEN)
        async with connect(srv.address, security=me) as c:
            run = await c.create_run(run_spec(workers=1, iterations=20))
            intruder = impl.start(srv.address, *tls, "--join-wait-seconds", "1", env={"PS_TOKEN": "wrong"})
            deadline = time.monotonic() + 30  # until it has been refused (start-up is slow on a busy machine)
            while "UNAUTHENTICATED" not in intruder.log.read_text() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            pending = await c.get_run(run.run_id)
            assert pending.state == pb.RUN_STATE_PENDING, "a worker with the wrong token took a rank"
            assert pending.workers[0].state == pb.WORKER_STATE_VACANT
            assert intruder.proc.poll() is None, "the worker gave up instead of retrying"
            assert "UNAUTHENTICATED" in intruder.log.read_text(), intruder.tail()
            worker = impl.start(srv.address, *tls, env={"PS_TOKEN": TOKEN})
            final = await finish(c, run.run_id, logs=impl.logs)
        assert worker.wait(20) == 0, impl.logs()
    assert final.state == pb.RUN_STATE_COMPLETED, (final.message, impl.logs())
    assert final.workers[0].pushes == 20
    assert len(final.shard_map.shards) == (2 if topology.sharded else 0)
    assert not any(s.data_port for s in final.shard_map.shards), final.shard_map


@pytest.mark.one_server("the handshake is with the server dialled, which on a cluster is one server as well")
async def test_a_tls_mismatch_is_said_once_naming_the_flag_to_change(impl: Impl, tmp_path: Path) -> None:
    """Another CA, another name, TLS to a plaintext server, mutual TLS without a client certificate,
    and plaintext to a TLS server: each said in the worker's log with the flag to change, in the
    Python SDK's words (tls_problem); the Node worker logged 'not reachable (UNAVAILABLE)' only, and
    so did the Python worker of a plaintext worker against a TLS server."""
    ca = _issue(tmp_path, "ca", None, ca=True)
    _issue(tmp_path, "server", ca, ca=False)
    _issue(tmp_path, "other", None, ca=True)
    pem = {n: str(tmp_path / f"{n}.pem") for n in ("ca", "server", "other")}
    tls = ("--tls-cert", pem["server"], "--tls-key", str(tmp_path / "server.key"))
    with ps_servers([tls, (*tls, "--tls-client-ca", pem["ca"]), ()]) as (secured, mutual, plain):
        cases = [(secured, ("--tls-ca", pem["other"]), ("its certificate is not trusted", "is --tls-ca the CA")),
                 (secured, ("--tls-ca", pem["ca"], "--tls-server-name", "elsewhere"),
                  ("not valid for 'elsewhere'", "set --tls-server-name to a name the certificate holds")),
                 (plain, ("--tls-ca", pem["ca"]), ("it answers in plaintext, not TLS: unset --tls-ca",)),
                 (mutual, ("--tls-ca", pem["ca"]), ("it wants a client certificate (mutual TLS): give one with "
                                                   "--tls-cert and --tls-key",)),
                 (secured, (), ("it answers in TLS, not plaintext: give --tls-ca, the CA that signed its certificate",))]
        workers = [impl.start(srv.address, *flags, "--idle-exit-seconds", "3", once=False) for srv, flags, _ in cases]
        for worker, (srv, flags, words) in zip(workers, cases, strict=True):
            worker.wait(30)
            said = [line for line in worker.log.read_text().splitlines() if f"cannot talk to the server at {srv.address}: "
                    in line]
            assert len(said) == 1 and all(w in said[0] for w in words), (flags, worker.tail())
            assert "not reachable (UNAVAILABLE)" in worker.log.read_text(), worker.tail()
