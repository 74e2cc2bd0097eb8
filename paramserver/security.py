"""How to reach a secured server: TLS settings and the bearer token, and the one place a token is read.

A token comes from the environment or from a file, never from the command line, where other users
of the machine could read it; a token over plaintext is refused unless the caller says ``insecure``
(it would cross the network readable by anyone on the path). The server reads its own token here
too (``ps_server.security``).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FLAGS", "Security", "check_ca", "check_key_pair", "read_token", "tls_problem"]

FLAGS: Mapping[str, str] = {"ca": "--tls-ca", "cert": "--tls-cert", "key": "--tls-key", "insecure": "--insecure",
                            "server_name": "--tls-server-name"}
"""How ps-worker names the settings (``Security.names``'s default); psctl names environment variables."""


def read_token(token: str, token_file: str, *, file_flag: str = "--token-file") -> str:
    """The token: ``token`` (from the environment) or the content of ``token_file``, without the
    white space around it (a file's, or a Kubernetes secret's, line end); ValueError when both are
    given, the file cannot be read or is empty, or the token holds what no header can carry (the
    message does not show it). ``file_flag`` names the setting in messages."""
    if token and token_file:
        raise ValueError(f"give the token either in PS_TOKEN or with {file_flag}, not both")
    if not token_file:
        return _headed(token.strip(), "PS_TOKEN")
    try:
        with open(token_file) as f:
            text = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read {file_flag} {token_file}: {exc.strerror}") from None
    if not text:
        raise ValueError(f"{file_flag} {token_file} is empty")
    return _headed(text, f"{file_flag} {token_file}")


def _headed(token: str, source: str) -> str:
    """``token``, which goes in an ``authorization`` header: printable ASCII only (gRPC refuses any
    other in a call, with an error that does not say why)."""
    bad = sum(not " " <= c <= "~" for c in token)
    if bad:
        raise ValueError(f"the token in {source} holds {bad} character(s) a header cannot carry (a line end, a "
                         "control or non-ASCII character): use printable ASCII, such as 'openssl rand -hex 32' gives")
    return token


@dataclass(frozen=True)
class Security:
    """TLS (``ca`` and/or a client ``cert``/``key``) and a token, as a client uses them."""

    ca: str = ""
    """CA bundle (PEM) to verify the server; TLS is on when this or ``cert`` is set."""
    cert: str = ""
    """Client certificate (PEM), for mutual TLS."""
    key: str = ""
    token: str = field(default="", repr=False)
    insecure: bool = False
    """Allow the token over plaintext."""
    server_name: str = ""
    """Name to expect in the server's certificate, when it differs from the host dialled."""
    names: Mapping[str, str] = field(default_factory=lambda: FLAGS, repr=False, compare=False)
    """How the caller's user sets ca, cert, key, insecure and server_name, for messages (``FLAGS``' keys)."""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert)

    def check(self) -> None:
        """ValueError when these settings cannot work."""
        n = self.names
        if bool(self.cert) != bool(self.key):
            raise ValueError(f"a client certificate needs both {n['cert']} and {n['key']}")
        if self.token and not self.tls and not self.insecure:
            raise ValueError(f"refusing to send the token over plaintext: use TLS ({n['ca']}) or {n['insecure']}")

    def read_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(CA, key, certificate) PEM bytes, None where unset; ValueError when unreadable or no PEM
        (loaded here first: gRPC only logs why it cannot, and the server then looks unreachable)."""
        def read(flag: str, path: str) -> bytes | None:
            try:
                return Path(path).read_bytes() if path else None
            except OSError as exc:
                raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from None

        n = self.names
        ca, key, cert = read(n["ca"], self.ca), read(n["key"], self.key), read(n["cert"], self.cert)
        if ca is not None:
            check_ca(n["ca"], self.ca, ca)
        if cert is not None:
            check_key_pair(n["cert"], self.cert, n["key"], self.key)
        return ca, key, cert


def check_ca(flag: str, path: str, pem: bytes) -> None:
    """ValueError unless ``pem`` (read from ``path``, which ``flag`` named) holds a PEM certificate:
    gRPC would only log why it cannot use it, and the peer would look unreachable or busy."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise ValueError(f"{flag} {path} holds no PEM certificate ({getattr(exc, 'reason', None) or exc})") from None


def check_key_pair(cert_flag: str, cert: str, key_flag: str, key: str) -> None:
    """ValueError unless the files ``cert`` and ``key`` are a PEM certificate and its unencrypted key."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{cert_flag} {cert} and {key_flag} {key} are not a PEM certificate and its unencrypted "
                         f"private key ({getattr(exc, 'reason', None) or exc})") from None


_NAME_MISMATCH = frozenset({62, 64})
"""X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH."""
_CERTIFICATE_WANTED = frozenset({"TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE",
                                 "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"})
"""A server's alerts that say it wants a client certificate, or not the one sent (BoringSSL under
TLS 1.3 just closes the connection)."""


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the server at ``host``:``port`` completes a TLS handshake (its certificate unchecked:
    only whether it speaks TLS; one that wants a client certificate says so after the handshake)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout) as raw, context.wrap_socket(raw):
            return True
    except OSError:  # (ssl.SSLError is one: a plaintext server, or nothing there)
        return False


def tls_problem(address: str, security: Security, timeout: float = 3.0) -> str:
    """Why the server at ``address`` (HOST:PORT) refuses a TLS connection made with ``security``,
    in its settings' terms; "" when it does not, or it cannot tell (nothing listens there, say).
    Blocking: for the error a user reads once a call failed UNAVAILABLE, where gRPC says only that
    no address could be reached. A handshake made here with the same files and name tells apart
    the server's certificate not trusted, a plaintext server and a client certificate it wants;
    without TLS, a server that speaks it."""
    from .tcp_transport import dial_host

    host, port = dial_host(address), address.rpartition(":")[2]
    if host is None or not port.isdigit():
        return ""
    n = security.names
    if not security.tls:
        if _speaks_tls(host, int(port), timeout):
            return f"it answers in TLS, not plaintext: give {n['ca']}, the CA that signed its certificate"
        return ""
    try:
        ca, _, _ = security.read_files()
        context = ssl.create_default_context(cadata=ca.decode("ascii") if ca else None)
        context.set_alpn_protocols(["h2"])
        if security.cert:
            context.load_cert_chain(security.cert, security.key)
        with socket.create_connection((host, int(port)), timeout) as raw, \
                context.wrap_socket(raw, server_hostname=security.server_name or host) as conn:
            if conn.recv(1):  # (an HTTP/2 server speaks first; one that wants a certificate closes)
                return ""
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NAME_MISMATCH:
            return (f"its certificate is not trusted ({exc.verify_message}): set {n['server_name']} to a name the "
                    "certificate holds")
        return f"its certificate is not trusted ({exc.verify_message}): is {n['ca']} the CA that signed it?"
    except ssl.SSLError as exc:
        if exc.reason == "WRONG_VERSION_NUMBER":
            return (f"it answers in plaintext, not TLS: unset {n['ca']} to talk to it so, or start it with "
                    "--tls-cert and --tls-key")
        if exc.reason not in _CERTIFICATE_WANTED:
            return f"the TLS handshake failed ({exc.reason})" if exc.reason else ""
    except (OSError, ValueError):
        return ""
    if security.cert:
        return (f"it closed the connection after the TLS handshake: it wants a client certificate its "
                f"--tls-client-ca signed, is {n['cert']} one?")
    return (f"it closed the connection after the TLS handshake: it wants a client certificate (mutual TLS): give "
            f"one with {n['cert']} and {n['key']}")
