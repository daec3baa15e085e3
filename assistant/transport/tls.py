"""TLS for people without a certificate authority: `python -m assistant tls-cert` and `serve --tls-self-signed`.

Owns the self-signed certificate (what it contains, where it lives by default, when an existing one is reused), the
server's `SSLContext`, and the text that tells a person how to configure the server and make each kind of client
trust the certificate.

The certificate is a self-signed *leaf*, not a local CA: `basicConstraints CA:FALSE`, `extendedKeyUsage serverAuth`,
an EC P-256 key, and a `subjectAltName` entry per host name or IP address (clients match only those; the subject CN
is a label). Node (`NODE_EXTRA_CA_CERTS`) and Python (`cafile` / `SSL_CERT_FILE`) accept such a certificate as its
own trust anchor (tests/test_node_sdk.py, tests/test_tls.py), so no CA key exists that could sign certificates for
other names, and a browser's "accept the risk" works (Firefox allows no exception for a CA certificate used as a
server's). The cost: adding a host name means a new certificate that clients must trust again. The `openssl`
program (Debian's `openssl`) makes it: the `cryptography` package is not a dependency of this project.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DAYS = 825  # the longest validity Apple platforms accept for a locally trusted server certificate
RENEW_BEFORE_DAYS = 30  # `serve --tls-self-signed` makes a new certificate when the old one has less left
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # always included: the server's own machine can always connect
CERT_NAME, KEY_NAME = "cert.pem", "key.pem"
_OPENSSL_TIMEOUT_S = 60.0
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class TlsError(ValueError):
    """A certificate cannot be made or used; the message names what was expected, what came and the fix."""


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def default_tls_dir() -> Path:
    """Where `tls-cert` and `serve --tls-self-signed` keep the certificate: a config dir, not a cache to be wiped."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "qwen-voice-assistant" / "tls"


def normalize_host(host: str) -> str:
    """A host name (lowercase) or IP address (canonical form) a client may connect to; else `TlsError`."""
    text = host.strip().lower().removesuffix(".")
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        if len(text) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in text.split(".")):
            return text
        raise TlsError(
            f"--host: expected a host name (e.g. myhost.local) or an IP address (e.g. 192.168.1.20), got {host!r}"
        ) from None
    if ip.is_unspecified:
        raise TlsError(
            f"--host: {host!r} means 'every interface', which no client connects to; "
            "give the names or addresses clients use (e.g. myhost.local, 192.168.1.20)"
        )
    return str(ip)


def cert_hosts_for(hosts: Iterable[str]) -> list[str]:
    """`hosts` normalized, after the local names, without repeats (the order the certificate lists them)."""
    out: list[str] = []
    for h in (*LOCAL_HOSTS, *hosts):
        n = normalize_host(h)
        if n not in out:
            out.append(n)
    return out


def _san(hosts: Sequence[str]) -> str:
    def entry(h: str) -> str:
        try:
            ipaddress.ip_address(h)
            return f"IP:{h}"
        except ValueError:
            return f"DNS:{h}"

    return ",".join(entry(h) for h in hosts)


def _openssl(args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    if exe is None:
        raise TlsError(f"{what} needs the openssl program, which is not installed; install Debian's openssl package")
    r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT_S)
    if r.returncode != 0:
        raise TlsError(f"{what}: openssl {args[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r


def make_self_signed(hosts: Iterable[str], out_dir: Path, days: int = DEFAULT_DAYS, force: bool = False) -> CertFiles:
    """Write `cert.pem` and `key.pem` (mode 0600) for `LOCAL_HOSTS` + `hosts` into `out_dir`.

    An existing pair is replaced only with `force`: clients that trust the old certificate stop connecting."""
    if not 1 <= days <= 3650:
        raise TlsError(f"--days: expected 1..3650, got {days}")
    names = cert_hosts_for(hosts)
    files = CertFiles(out_dir / CERT_NAME, out_dir / KEY_NAME)
    if not force and (files.cert.exists() or files.key.exists()):
        raise TlsError(
            f"{files.cert} already exists; pass --force to replace it (clients that trust it must then be given "
            "the new certificate), or --out DIR for another directory"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return _write_pair(names, out_dir, days, files)
    except OSError as e:
        raise TlsError(
            f"cannot write the certificate into {out_dir}: {e}; choose another directory with --out DIR"
        ) from None


def _write_pair(names: list[str], out_dir: Path, days: int, files: CertFiles) -> CertFiles:
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".new-") as tmp:  # 0700: the key is never readable by others
        cert, key = Path(tmp) / CERT_NAME, Path(tmp) / KEY_NAME
        cmd = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", str(days)]
        cmd += ["-subj", "/CN=Qwen voice assistant (self-signed)", "-keyout", str(key), "-out", str(cert)]
        # -addext overrides the same extension of the system openssl.cnf's default (CA:TRUE) section.
        for ext in (
            f"subjectAltName={_san(names)}",
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            "extendedKeyUsage=serverAuth",
        ):
            cmd += ["-addext", ext]
        _openssl(cmd, "making the certificate")
        key.chmod(0o600)
        os.replace(key, files.key)  # the key first: a cert.pem is never newer than its key
        os.replace(cert, files.cert)
    return files


@dataclass(frozen=True)
class CertInfo:
    hosts: list[str]
    not_after_s: float  # epoch seconds


def read_cert(cert: Path) -> CertInfo:
    """The host names/IPs (subjectAltName) and the expiry of a PEM certificate."""
    r = _openssl(["x509", "-in", str(cert), "-noout", "-enddate", "-ext", "subjectAltName"], f"reading {cert}")
    lines = r.stdout.splitlines()
    end = next((ln.split("=", 1)[1] for ln in lines if ln.startswith("notAfter=")), None)
    if end is None:
        raise TlsError(f"reading {cert}: openssl printed no notAfter= line: {r.stdout[:200]!r}")
    hosts = []
    for entry in ",".join(ln for ln in lines if ":" in ln and not ln.startswith(("notAfter=", "X509v3"))).split(","):
        kind, _, value = entry.strip().partition(":")
        if kind in ("DNS", "IP Address"):
            hosts.append(str(ipaddress.ip_address(value)) if kind == "IP Address" else value.lower())
    return CertInfo(hosts=hosts, not_after_s=ssl.cert_time_to_seconds(end))


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The server side of `server.tls_cert` / `server.tls_key`; a missing or mismatched file is a `TlsError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(
            f"server.tls_cert {str(cert)!r} / server.tls_key {str(key)!r}: expected a PEM certificate and its "
            f"private key, got {e}; make a pair with `python -m assistant tls-cert --host NAME`"
        ) from None
    return ctx


def _reusable(files: CertFiles, needed: Sequence[str], now_s: float) -> tuple[str | None, list[str]]:
    """(why `files` cannot be used for `needed`, or None; the hosts it already covers)."""
    if not files.cert.exists() or not files.key.exists():
        return "none made yet", []
    try:
        server_context(files.cert, files.key)
        info = read_cert(files.cert)
    except TlsError as e:
        return str(e), []
    days_left = (info.not_after_s - now_s) / 86400
    if days_left < RENEW_BEFORE_DAYS:
        return f"it expires in {days_left:.0f} days", info.hosts
    missing = [h for h in needed if h not in info.hosts]
    if missing:
        return f"it does not cover {', '.join(missing)}", info.hosts
    return None, info.hosts


def self_signed_hosts(server_host: str) -> list[str]:
    """What `serve --tls-self-signed` certifies: the local names, this machine's name (and its mDNS `.local`
    form), and `server.host` when it is one address rather than every interface."""
    name = socket.gethostname()
    valid = []
    for h in (name, *([f"{name}.local"] if "." not in name else []), server_host):
        with contextlib.suppress(TlsError):  # an odd machine name or a wildcard server.host is left out
            valid.append(normalize_host(h))
    return cert_hosts_for(valid)


def ensure_self_signed(server_host: str, out_dir: Path | None = None) -> tuple[CertFiles, str | None]:
    """The certificate `serve --tls-self-signed` uses: the one in `out_dir` (default `default_tls_dir()`) when it
    loads, has `RENEW_BEFORE_DAYS` left and covers `server.host`; else a new one for `self_signed_hosts` plus every
    host the old one had. Returns the files and why a new one was made (None when reused)."""
    out_dir = out_dir or default_tls_dir()
    files = CertFiles(out_dir / CERT_NAME, out_dir / KEY_NAME)
    try:
        needed = [normalize_host(server_host)]
    except TlsError:  # "0.0.0.0": every interface, no one name that must be covered
        needed = []
    wanted = self_signed_hosts(server_host)
    why, had = _reusable(files, needed, time.time())
    if why is None:
        return files, None
    return make_self_signed([*wanted, *had], out_dir, force=True), why


def setup_text(files: CertFiles, info: CertInfo, port: int = 8765) -> str:
    """What to put in the config and how each kind of client trusts the certificate (`info`: `read_cert`)."""
    cert, key = files.cert.resolve(), files.key.resolve()
    q = shlex.quote
    lan = next((h for h in info.hosts if h not in LOCAL_HOSTS), "localhost")
    base = f"{'[' + lan + ']' if ':' in lan else lan}:{port}"
    until = time.strftime("%Y-%m-%d", time.gmtime(info.not_after_s))
    return f"""\
Self-signed certificate for {", ".join(info.hosts)} (valid until {until}):
  certificate: {cert}   (give it to clients: it holds no secret)
  private key: {key}   (keep it on the server)

Serve with it: put this in your config file (--config FILE)
  [server]
  host = "0.0.0.0"   # every interface; clients must use a name or address listed above
  tls_cert = {json.dumps(str(cert))}
  tls_key = {json.dumps(str(key))}
or pass the flags:
  python -m assistant serve --host 0.0.0.0 --tls-cert {q(str(cert))} --tls-key {q(str(key))}
Clients then connect to wss://{base}/v1/realtime (the browser page: https://{base}/).

Make clients trust it:
  Node (openai, @openai/agents-realtime):
    NODE_EXTRA_CA_CERTS={q(str(cert))} node app.js
  Python (openai, websockets):
    SSL_CERT_FILE={q(str(cert))} python app.py   # that process then trusts only this certificate
    or in code: ctx = ssl.create_default_context(cafile={json.dumps(str(cert))}), passed as
    websocket_connection_options={{"ssl": ctx}} (openai) or ssl=ctx (websockets.connect)
  curl:
    curl --cacert {q(str(cert))} https://{base}/healthz
  Browsers: open https://{base}/ once and accept the warning (Firefox: "Accept the Risk and Continue";
    Chrome: "Advanced", then "Proceed"); the page's WebSocket uses the same certificate.
"""
