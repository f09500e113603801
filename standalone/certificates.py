"""A folder -> a local certificate authority and a server certificate it signed, for https on this machine.

fal's Python client only speaks https (`https://{FAL_RUN_HOST}/...`) and trusts the CA file named by SSL_CERT_FILE,
so `python -m comfyui_krea make-cert DIR` writes three files into DIR:

- `ca.pem`: the CA certificate, what clients trust (SSL_CERT_FILE for Python, NODE_EXTRA_CA_CERTS for Node).
- `server.pem`: the server's certificate alone (the CA is the trust anchor, so no chain is needed; Python's ssl,
  aiohttp and Node accept it as it is).
- `server-key.pem`: the server's private key, created with 0o600 permissions.

The CA's private key is never written: it signs the one server certificate and is dropped, so trusting `ca.pem`
trusts that certificate and nothing else anyone could mint later. Both certificates carry the extensions that
OpenSSL 3's strict verification (Python 3.13's default VERIFY_X509_STRICT) requires: key identifiers, critical
basic constraints, key usages and a subject alternative name for every host. Existing files are never overwritten.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..fal_api.settings import DEFAULT_PORT

CA_NAME = "ca.pem"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server-key.pem"
CA_COMMON_NAME = "comfyui-krea local CA"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path  # ca.pem: what clients trust
    server_cert: Path  # server.pem: the server's certificate, no chain
    server_key: Path  # server-key.pem: its private key, mode 0o600


def certificate_paths(folder: Path) -> Certificates:
    """The three files make_certificates writes into `folder` (absolute paths; nothing is read or written)."""
    folder = Path(folder).expanduser().absolute()
    return Certificates(folder / CA_NAME, folder / SERVER_CERT_NAME, folder / SERVER_KEY_NAME)


def make_certificates(folder: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 825) -> Certificates:
    """Write a new CA and a server certificate for `hosts` (names and IP addresses) valid for `days` into `folder`.

    The folder is made if missing. Raises FileExistsError, writing nothing, if any of the three files exists.
    """
    names = _host_names(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive whole number, got {days!r}")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as error:
        raise RuntimeError("making certificates needs the cryptography package: pip install cryptography") from error

    certs = certificate_paths(folder)
    targets = (certs.ca_cert, certs.server_cert, certs.server_key)
    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"{target} already exists; refusing to overwrite it (pick an empty folder)")

    def key_usage(**on: bool) -> x509.KeyUsage:
        flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
                 "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
        return x509.KeyUsage(**{flag: on.get(flag, False) for flag in flags})

    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [
        x509.IPAddress(name) if isinstance(name, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else x509.DNSName(name)
        for name in names
    ]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0]))]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    contents = (
        (certs.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (certs.server_key, key_pem, 0o600),
    )
    written: list[Path] = []
    try:
        for target, data, mode in contents:
            _write_new_file(target, data, mode)
            written.append(target)
    except BaseException:
        for target in written:  # only files this call made: leave no half set behind
            target.unlink(missing_ok=True)
        raise
    return certs


def client_settings(certs: Certificates, host: str = "127.0.0.1", port: int = DEFAULT_PORT, prefix: str = "") -> str:
    """The lines a user pastes to point fal's clients (and start the server) at https://host:port{prefix}."""
    netloc = f"{_url_host(host)}:{int(port)}"
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    base = f"https://{netloc}{prefix}"
    ca = _quote(certs.ca_cert)
    cert = _quote(certs.server_cert)
    key = _quote(certs.server_key)
    lines = [
        "# The server: `python -m comfyui_krea serve` takes",
        f"--tls-cert {cert} --tls-key {key}",
        "# ComfyUI (fal's routes under /fal) takes",
        f"--tls-certfile {cert} --tls-keyfile {key}",
        "",
        "# Python (fal-client): in the shell that runs your script, before Python starts",
        f"export FAL_RUN_HOST={netloc}{prefix}",
        f"export FAL_QUEUE_RUN_HOST={netloc}{prefix}/queue",
        f"export SSL_CERT_FILE={ca}",
        "export FAL_KEY=any-value  # your key if the server checks one; any value if it has none",
        "# SSL_CERT_FILE replaces the bundled CA list in that process: https to other hosts fails there.",
        "# fal_client.upload_file ignores FAL_RUN_HOST (it calls rest.fal.ai and v3.fal.media); for uploads",
        "# set these in Python before the first upload:",
        "#   import fal_client.client",
        f'#   fal_client.client.REST_URL = "{base}"',
        f'#   fal_client.client.CDN_URL = "{base}"',
        "",
        "# JavaScript (@fal-ai/client on Node): set before node starts (Node reads it once, at startup)",
        f"export NODE_EXTRA_CA_CERTS={ca}",
        "# and in your code:",
        f'fal.config({{ proxyUrl: {{ url: "{base}/proxy", when: "always" }} }})',
        f"# The proxy works over plain http too (http://{netloc}{prefix}/proxy, without NODE_EXTRA_CA_CERTS) when",
        "# the server also listens on http.",
    ]
    return "\n".join(lines) + "\n"


def _host_names(hosts: Sequence[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address | str]:
    """Hosts -> IP addresses and ASCII DNS names, in order, without repeats; ValueError for none or a bad one."""
    if isinstance(hosts, str):
        hosts = (hosts,)
    names: list[ipaddress.IPv4Address | ipaddress.IPv6Address | str] = []
    for host in hosts:
        text = str(host).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if not text:
            raise ValueError(f"empty host name in {list(hosts)!r}")
        name: ipaddress.IPv4Address | ipaddress.IPv6Address | str
        try:
            name = ipaddress.ip_address(text)
        except ValueError:
            if any(character in text for character in " /:@\\"):
                raise ValueError(f"{host!r} is neither a host name nor an IP address") from None
            try:
                name = text.encode("idna").decode("ascii").lower() if not text.isascii() else text.lower()
            except UnicodeError as error:
                raise ValueError(f"{host!r} is not a valid host name") from error
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("at least one host name or IP address is needed")
    return names


def _write_new_file(target: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file `target` with `mode`, atomically; FileExistsError if `target` appeared meanwhile.

    The bytes go to a temporary file in the same folder, created with `mode` (a key is never readable by others,
    not even for a moment), then are linked into place; where hard links are unsupported, os.replace does it.
    """
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    descriptor = os.open(temporary, flags, mode)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(descriptor, mode)  # exactly `mode`, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, target)  # fails if target exists: never clobbers
        except FileExistsError:
            raise FileExistsError(f"{target} already exists; refusing to overwrite it") from None
        except OSError:
            if target.exists() or target.is_symlink():
                raise FileExistsError(f"{target} already exists; refusing to overwrite it") from None
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _url_host(host: str) -> str:
    """A host as it goes into a URL: IPv6 addresses in brackets."""
    host = host.strip()
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _quote(path: Path) -> str:
    return shlex.quote(str(Path(path).absolute()))
