"""TLS, mutual TLS and bearer tokens: wrong or missing credentials are refused with the right code."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import make_spec, with_config

from paramserver.client import PsClient
from paramserver.errors import Code, PsError
from paramserver.security import Security
from paramserver.v1 import paramserver_pb2 as pb
from paramserver.v1 import paramserver_pb2_grpc as pb_grpc
from ps_server.config import ServerConfig
from ps_server.security import ConfigError
from ps_server.server import start_server

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-for-tests"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name: str, issuer_key, *, ca: bool, san: bool = False) -> x509.Certificate:  # type: ignore[no-untyped-def]
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, obj) -> Path:  # type: ignore[no-untyped-def]
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    other = _cert("other-ca", other_key, "other-ca", other_key, ca=True)
    skey, ckey = _key(), _key()
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", _cert("localhost", skey, "test-ca", ca_key, ca=False, san=True)),
        server_key=_write(d / "server.key", skey),
        client_cert=_write(d / "client.pem", _cert("worker", ckey, "test-ca", ca_key, ca=False)),
        client_key=_write(d / "client.key", ckey),
        other_ca=_write(d / "other-ca.pem", other),
    )


async def _call(port: int, security: Security | None) -> grpc.StatusCode:
    """OK if an authenticated RPC (CreateRun) goes through, else the status code it got."""
    async with PsClient(f"127.0.0.1:{port}", timeout=5, security=security) as c:
        try:
            await c.create_run(make_spec(num_workers=1))
            return grpc.StatusCode.OK
        except PsError as exc:
            if exc.code == Code.UNAUTHENTICATED:
                assert exc.reason == pb.ERROR_REASON_UNAUTHENTICATED, exc.info
            return {c.value[0]: c for c in grpc.StatusCode}[exc.code]


async def _health(port: int, security: Security | None) -> str:
    async with PsClient(f"127.0.0.1:{port}", timeout=5, security=security) as c:
        return await c.health()


async def test_tls_and_token_matrix(server_config: ServerConfig, pki: Pki) -> None:
    cfg = with_config(server_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), token=TOKEN)
    ps = await start_server(cfg)
    try:
        good = Security(ca=str(pki.ca), token=TOKEN)
        assert await _call(ps.port, good) == grpc.StatusCode.OK
        assert await _call(ps.port, Security(ca=str(pki.ca), token="wrong")) == grpc.StatusCode.UNAUTHENTICATED
        assert await _call(ps.port, Security(ca=str(pki.ca))) == grpc.StatusCode.UNAUTHENTICATED
        # health stays open for probes: no token needed
        assert await _health(ps.port, Security(ca=str(pki.ca))) == "SERVING"
        # plaintext to a TLS server, and a server certificate from an untrusted CA: no connection
        assert await _call(ps.port, Security(token=TOKEN, insecure=True)) == grpc.StatusCode.UNAVAILABLE
        assert await _call(ps.port, Security(ca=str(pki.other_ca), token=TOKEN)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await ps.stop(0)


async def test_mutual_tls(server_config: ServerConfig, pki: Pki) -> None:
    cfg = with_config(server_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                      tls_client_ca=str(pki.ca))
    ps = await start_server(cfg)
    try:
        with_cert = Security(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key))
        assert await _call(ps.port, with_cert) == grpc.StatusCode.OK
        assert await _call(ps.port, Security(ca=str(pki.ca))) == grpc.StatusCode.UNAVAILABLE
    finally:
        await ps.stop(0)


async def test_token_over_plaintext_needs_insecure(server_config: ServerConfig) -> None:
    with pytest.raises(ConfigError, match="plaintext"):
        await start_server(with_config(server_config, token=TOKEN))
    with pytest.raises(ValueError, match="plaintext"):
        PsClient("127.0.0.1:1", security=Security(token=TOKEN))
    ps = await start_server(with_config(server_config, token=TOKEN, insecure=True))
    try:
        assert await _call(ps.port, Security(token=TOKEN, insecure=True)) == grpc.StatusCode.OK
        assert await _call(ps.port, None) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await ps.stop(0)


def test_token_is_never_a_flag_nor_printed() -> None:
    from ps_server.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--token", "x"], {})
    cfg = parse_config([], {"PS_TOKEN": TOKEN})
    assert cfg.token == TOKEN and TOKEN not in repr(cfg)


def _scrape(port: int, context: ssl.SSLContext) -> int:
    """The status of a scrape of https://127.0.0.1:``port``/metrics, or -1 when it could not connect."""
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=context, timeout=5) as resp:
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return -1


async def test_metrics_under_mutual_tls_need_a_client_certificate(server_config: ServerConfig, pki: Pki) -> None:
    """The endpoint is as protected as the gRPC port: with --tls-client-ca, a scrape without a
    certificate from that CA gets nothing (it got every run's counters)."""
    ps = await start_server(with_config(server_config, metrics_port=0, tls_cert=str(pki.server_cert),
                                        tls_key=str(pki.server_key), tls_client_ca=str(pki.ca)))
    try:
        assert ps.metrics_port
        without = ssl.create_default_context(cafile=str(pki.ca))
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert await asyncio.to_thread(_scrape, ps.metrics_port, without) == -1
        assert await asyncio.to_thread(_scrape, ps.metrics_port, with_cert) == 200
    finally:
        await ps.stop(0)


async def test_a_silent_connection_does_not_block_metrics_over_tls(server_config: ServerConfig, pki: Pki) -> None:
    """The TLS handshake runs in the scrape's own thread: a client that connects and sends nothing
    held the accepting thread (every scrape after it timed out, for as long as it stayed)."""
    ps = await start_server(with_config(server_config, metrics_port=0, tls_cert=str(pki.server_cert),
                                        tls_key=str(pki.server_key)))
    try:
        with socket.create_connection(("127.0.0.1", ps.metrics_port)):
            await asyncio.sleep(0.2)  # (accepted, its handshake not begun)
            assert await asyncio.to_thread(_scrape, ps.metrics_port,
                                           ssl.create_default_context(cafile=str(pki.ca))) == 200
    finally:
        await ps.stop(0)


async def test_psctl_against_a_secured_server_says_which_of_its_settings_is_missing(server_config: ServerConfig,
                                                                                    pki: Pki) -> None:
    """Plaintext to a TLS server: psctl said only that it could not reach a paramserver and how to start
    one (then that one requiring TLS needs PSCTL_TLS_CA; now that this one speaks TLS); and without a
    token it names psctl's way to give one (PS_TOKEN or PSCTL_TOKEN_FILE)."""
    from typer.testing import CliRunner

    from client.cli import app

    cfg = with_config(server_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), token=TOKEN)
    ps = await start_server(cfg)
    addr = f"127.0.0.1:{ps.port}"

    def psctl(env: dict[str, str]) -> tuple[int, str]:
        result = CliRunner().invoke(app, ["runs", "--server", addr, "--timeout", "3"], env=env)
        return result.exit_code, result.stderr

    try:
        code, err = await asyncio.to_thread(psctl, {"PS_TOKEN": TOKEN, "PSCTL_INSECURE": "1"})
        assert code == 1 and "it answers in TLS, not plaintext: give PSCTL_TLS_CA" in err and "Start one" not in err, err
        code, err = await asyncio.to_thread(psctl, {"PSCTL_TLS_CA": str(pki.ca), "PS_TOKEN": ""})
        assert code == 1 and "UNAUTHENTICATED" in err and "PS_TOKEN" in err and "PSCTL_TOKEN_FILE" in err, err
    finally:
        await ps.stop(0)


async def test_a_tls_mismatch_says_which_setting_to_change(server_config: ServerConfig, pki: Pki) -> None:
    """A CA that did not sign the server's certificate, a name not in it, TLS to a plaintext server
    and mutual TLS without a client certificate: psctl said each time that it could not reach a
    paramserver and how to start one (gRPC's reason, if any, inside), and ps-worker only 'not
    reachable (UNAVAILABLE)', retrying for ever. Each now names the problem and its setting."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from client.cli import app

    tls = await start_server(with_config(server_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)))
    mutual = await start_server(with_config(server_config, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                                            tls_client_ca=str(pki.ca)))
    plain = await start_server(server_config)

    def psctl(port: int, env: dict[str, str]) -> str:
        result = CliRunner().invoke(app, ["runs", "--server", f"127.0.0.1:{port}", "--timeout", "3"], env=env)
        assert result.exit_code == 1
        return result.stderr

    ca = str(pki.ca)
    try:
        cases = [(tls.port, {"PSCTL_TLS_CA": str(pki.other_ca)}, ("not trusted", "PSCTL_TLS_CA")),
                 (tls.port, {"PSCTL_TLS_CA": ca, "PSCTL_TLS_SERVER_NAME": "elsewhere"},
                  ("not valid for 'elsewhere'", "PSCTL_TLS_SERVER_NAME")),
                 (plain.port, {"PSCTL_TLS_CA": ca}, ("plaintext", "PSCTL_TLS_CA")),
                 (mutual.port, {"PSCTL_TLS_CA": ca}, ("client certificate", "PSCTL_TLS_CERT"))]
        for port, env, words in cases:
            err = await asyncio.to_thread(psctl, port, env)
            assert all(w in err for w in words) and "Start one" not in err, (env, err)
        worker = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "worker.main", "--server", f"127.0.0.1:{tls.port}", "--tls-ca",
                             str(pki.other_ca), "--idle-exit-seconds", "1"], capture_output=True, text=True, timeout=30)
        assert "not trusted" in worker.stderr and "--tls-ca" in worker.stderr, worker.stderr
    finally:
        for ps in (tls, mutual, plain):
            await ps.stop(0)


async def test_a_token_with_a_line_end_works_and_one_no_header_can_carry_is_refused(server_config: ServerConfig) -> None:
    """A token from a file is stripped; one from PS_TOKEN was taken as it was: with the line end a
    Kubernetes secret made from a file holds, the server expected it in every call, which no client
    can send (gRPC refuses a header with a line end): psctl and workers died with gRPC's
    ExecuteBatchError. Non-ASCII characters, which no header carries either, are refused at
    start, naming the variable and not the token."""
    from client.spec import security_from_env
    from ps_server.config import parse_config

    cfg = parse_config(["--port", "0", "--insecure"], {"PS_TOKEN": TOKEN + "\n"})
    ps = await start_server(with_config(server_config, token=cfg.token, insecure=True))
    try:
        security = security_from_env({"PS_TOKEN": f" {TOKEN}\r\n", "PSCTL_INSECURE": "1"})
        assert await _call(ps.port, security) == grpc.StatusCode.OK
    finally:
        await ps.stop(0)
    for bad in ("s3cr\u00e9t", "s3c\nret"):
        with pytest.raises(ValueError, match="PS_TOKEN") as caught:
            security_from_env({"PS_TOKEN": bad, "PSCTL_INSECURE": "1"})
        assert bad not in str(caught.value)
        with pytest.raises(ConfigError, match="PS_TOKEN"):
            await start_server(with_config(server_config, token=bad, insecure=True))


async def test_tls_older_than_1_2_is_refused_on_the_grpc_and_metrics_ports(server_config: ServerConfig,
                                                                          pki: Pki) -> None:
    """The README says TLS is 1.2 or newer (gRPC's and Python's minimum): held to it on both ports."""
    import warnings

    ps = await start_server(with_config(server_config, metrics_port=0, tls_cert=str(pki.server_cert),
                                        tls_key=str(pki.server_key)))

    def handshake(port: int, version: ssl.TLSVersion) -> bool:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.set_alpn_protocols(["h2"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (TLS 1.1 is: the point)
            context.set_ciphers("ALL:@SECLEVEL=0")
            context.minimum_version = context.maximum_version = version
        try:
            with socket.create_connection(("127.0.0.1", port), 5) as raw, \
                    context.wrap_socket(raw, server_hostname="localhost"):
                return True
        except ssl.SSLError:
            return False

    try:
        for port in (ps.port, ps.metrics_port):
            assert await asyncio.to_thread(handshake, port, ssl.TLSVersion.TLSv1_2)
            assert not await asyncio.to_thread(handshake, port, ssl.TLSVersion.TLSv1_1)
    finally:
        await ps.stop(0)


def _start_up_log(*args: str, env: dict[str, str] | None = None) -> str:
    """ps-server's log from its start to its last start-up line; then it is stopped."""
    import subprocess
    import sys

    from procs import ENV

    proc = subprocess.Popen([sys.executable, "-m", "ps_server.server", "--port", "0", "--data-port", "-1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**ENV, **(env or {})})
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "runs may hold" in line:
                break
    finally:
        proc.terminate()
        proc.wait(20)
    return "".join(lines)


def test_the_server_says_at_start_how_it_is_secured(pki: Pki) -> None:
    """It said nothing of it: a server started without PS_TOKEN (a forgotten variable) and on
    0.0.0.0 served every run to the network without a word; and its metrics under TLS were
    announced as http://, which a scrape so configured cannot read."""
    both = _start_up_log("--host", "0.0.0.0", "--metrics-port", "0", "--tls-cert", str(pki.server_cert),
                         "--tls-key", str(pki.server_key), env={"PS_TOKEN": TOKEN})
    assert "TLS and the bearer token" in both and "WARNING" not in both and "https://0.0.0.0:" in both, both
    assert TOKEN not in both
    open_ = _start_up_log("--host", "0.0.0.0", "--metrics-port", "0")
    assert "WARNING" in open_ and "no TLS and no token" in open_ and "http://0.0.0.0:" in open_, open_
    local = _start_up_log()
    assert "no TLS and no token" in local and "WARNING" not in local, local


async def test_a_tls_server_s_health_can_be_probed_in_plaintext_on_its_health_port(server_config: ServerConfig,
                                                                                   pki: Pki) -> None:
    """Kubernetes' gRPC probes and compose's health check speak plaintext: under TLS they failed on
    the gRPC port, and the server was restarted for ever (its liveness) or never healthy (the
    workers waiting on it). --health-port serves grpc.health.v1 alone, in plaintext: it says
    SERVING, then NOT_SERVING as the server stops, and nothing else is served there."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ps = await start_server(with_config(server_config, health_port=0, tls_cert=str(pki.server_cert),
                                        tls_key=str(pki.server_key), tls_client_ca=str(pki.ca), token=TOKEN))
    try:
        assert ps.health_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ps.health_port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert (await check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.RunServiceStub(channel).ListRuns(pb.ListRunsRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            await ps.health.enter_graceful_shutdown()  # (stop's first step)
            assert (await check(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await ps.stop(0)
