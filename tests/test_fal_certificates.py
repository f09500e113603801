"""fal_api.certificates: make-cert's CA and server certificate, checked over TLS with httpx, fal-client and Node."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("cryptography")
httpx = pytest.importorskip("httpx")

from comfyui_krea.standalone.certificates import (  # noqa: E402
    Certificates,
    certificate_paths,
    client_settings,
    make_certificates,
)

SUBPROCESS_TIMEOUT = 30


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs") / "tls")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA: trusting it must not make the first server trusted."""
    return make_certificates(tmp_path_factory.mktemp("other")).ca_cert


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._reply(b"ok", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append(  # type: ignore[attr-defined]
            {"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
        self._reply(json.dumps({"images": [], "seed": 1}).encode(), "application/json")

    def _reply(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        pass


class _TLSServer(ThreadingHTTPServer):
    """Accepts plain sockets and does each handshake in the connection's own thread, recording failures."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.seen: list[dict] = []
        self.errors: list[BaseException] = []

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        self.errors.append(sys.exc_info()[1])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(certs: Certificates) -> Iterator[_TLSServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    tls_server = _TLSServer(context)
    thread = threading.Thread(target=tls_server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield tls_server
    tls_server.shutdown()
    tls_server.server_close()
    thread.join(5)


def _port(tls_server: _TLSServer) -> int:
    return tls_server.server_address[1]


def _child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("FAL_", "SSL_CERT", "NODE_EXTRA_CA", "REQUESTS_CA"))
           and key.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


def test_three_files_key_private_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "tls"  # made, parents too
    certs = make_certificates(folder)
    files = (certs.ca_cert, certs.server_cert, certs.server_key)
    assert [path.name for path in files] == ["ca.pem", "server.pem", "server-key.pem"]
    assert all(path.is_absolute() and path.parent == folder for path in files)
    assert sorted(path.name for path in folder.iterdir()) == ["ca.pem", "server-key.pem", "server.pem"]  # no temps
    if os.name == "posix":
        assert certs.server_key.stat().st_mode & 0o777 == 0o600
    assert certs.ca_cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert certs.server_cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1
    assert certs.server_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    before = {path: path.read_bytes() for path in files}

    with pytest.raises(FileExistsError, match="ca.pem"):
        make_certificates(folder)
    assert {path: path.read_bytes() for path in files} == before

    # One existing file (a user's key) is enough to refuse, and nothing is written beside it.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "server-key.pem").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="server-key.pem"):
        make_certificates(lone)
    assert [path.name for path in lone.iterdir()] == ["server-key.pem"]
    assert (lone / "server-key.pem").read_bytes() == b"precious"


def test_certificate_extensions(certs: Certificates) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert ca.subject.rfc4514_string() == "CN=comfyui-krea local CA"
    assert leaf.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    start = leaf.not_valid_before_utc
    assert 3500 < (leaf.not_valid_after_utc - start).total_seconds() - 825 * 86400 < 3700  # from now - 1 h


def test_tls_round_trip_with_httpx(certs: Certificates, other_ca: Path, server: _TLSServer) -> None:
    port = _port(server)
    trusting = ssl.create_default_context(cafile=str(certs.ca_cert))
    trusting.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: key identifiers must be there
    with httpx.Client(verify=trusting, trust_env=False, timeout=10) as client:
        for url in (f"https://127.0.0.1:{port}/", f"https://localhost:{port}/"):
            response = client.get(url)
            assert (response.status_code, response.text) == (200, "ok"), url
    for verify in (ssl.create_default_context(cafile=str(other_ca)), ssl.create_default_context()):
        with httpx.Client(verify=verify, trust_env=False, timeout=10) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                client.get(f"https://127.0.0.1:{port}/")


FAL_RUN = """
import json, sys
import fal_client, fal_client.client
if len(sys.argv) > 1:
    fal_client.client.MAX_ATTEMPTS = 1  # transport errors (certificate ones too) are retried 10 times with backoff
print(json.dumps(fal_client.run("fal-ai/flux/krea", arguments={"prompt": "x"})))
"""


def test_real_fal_client_trusts_the_ca_through_ssl_cert_file(
        certs: Certificates, other_ca: Path, server: _TLSServer) -> None:
    port = _port(server)
    hosts = {"FAL_KEY": "test", "FAL_RUN_HOST": f"127.0.0.1:{port}", "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{port}/queue"}
    before = len(server.seen)
    run = subprocess.run([sys.executable, "-c", FAL_RUN], env=_child_env(SSL_CERT_FILE=str(certs.ca_cert), **hosts),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"images": [], "seed": 1}
    [seen] = server.seen[before:]
    assert seen["path"] == "/fal-ai/flux/krea"
    assert seen["authorization"] == "Key test"
    assert json.loads(seen["body"]) == {"prompt": "x"}

    # Trusting a different CA: the same client refuses the server (one attempt, not ten with backoff).
    run = subprocess.run([sys.executable, "-c", FAL_RUN, "once"], env=_child_env(SSL_CERT_FILE=str(other_ca), **hosts),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in run.stderr
    assert len(server.seen) == before + 1


NODE_GET = """
const https = require("https");
https.get(process.argv[1], (response) => {
  let body = "";
  response.on("data", (chunk) => { body += chunk; });
  response.on("end", () => { console.log(response.statusCode + " " + body); });
}).on("error", (error) => { console.error(error.code); process.exit(2); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_node_trusts_the_ca_through_node_extra_ca_certs(certs: Certificates, server: _TLSServer) -> None:
    port = _port(server)
    for host in ("127.0.0.1", "localhost"):
        run = subprocess.run(["node", "-e", NODE_GET, f"https://{host}:{port}/"],
                             env=_child_env(NODE_EXTRA_CA_CERTS=str(certs.ca_cert)),
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert (run.returncode, run.stdout.strip()) == (0, "200 ok"), run.stderr
    run = subprocess.run(["node", "-e", NODE_GET, f"https://127.0.0.1:{port}/"], env=_child_env(),
                         capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert run.returncode == 2
    assert run.stderr.strip() in ("UNABLE_TO_VERIFY_LEAF_SIGNATURE", "UNABLE_TO_GET_ISSUER_CERT_LOCALLY")


def test_client_settings_lines(certs: Certificates) -> None:
    ca = shlex.quote(str(certs.ca_cert.absolute()))
    text = client_settings(certs)
    lines = text.splitlines()
    assert "export FAL_RUN_HOST=127.0.0.1:8443" in lines
    assert "export FAL_QUEUE_RUN_HOST=127.0.0.1:8443/queue" in lines
    assert f"export SSL_CERT_FILE={ca}" in lines
    assert f"export NODE_EXTRA_CA_CERTS={ca}" in lines
    assert any(line.startswith("export FAL_KEY=") for line in lines)
    assert f"--tls-cert {shlex.quote(str(certs.server_cert))} --tls-key {shlex.quote(str(certs.server_key))}" in lines
    assert any(line.startswith("--tls-certfile ") and "--tls-keyfile " in line for line in lines)
    assert '#   fal_client.client.REST_URL = "https://127.0.0.1:8443"' in lines
    assert '#   fal_client.client.CDN_URL = "https://127.0.0.1:8443"' in lines
    assert 'fal.config({ proxyUrl: { url: "https://127.0.0.1:8443/proxy", when: "always" } })' in lines

    lines = client_settings(certs, port=8188, prefix="/fal").splitlines()
    assert "export FAL_RUN_HOST=127.0.0.1:8188/fal" in lines
    assert "export FAL_QUEUE_RUN_HOST=127.0.0.1:8188/fal/queue" in lines
    assert 'fal.config({ proxyUrl: { url: "https://127.0.0.1:8188/fal/proxy", when: "always" } })' in lines
    assert client_settings(certs, port=8188, prefix="fal/") == client_settings(certs, port=8188, prefix="/fal")
    assert "export FAL_RUN_HOST=[::1]:8443" in client_settings(certs, host="::1").splitlines()


def test_bad_arguments(tmp_path: Path) -> None:
    for hosts in ((), ("",), ("http://x",)):
        with pytest.raises(ValueError):
            make_certificates(tmp_path / "bad", hosts=hosts)
    with pytest.raises(ValueError):
        make_certificates(tmp_path / "bad", days=0)
    assert not (tmp_path / "bad").exists()


def test_without_cryptography_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography", None)  # `import cryptography` now raises ImportError
    with pytest.raises(RuntimeError, match="pip install cryptography"):
        make_certificates(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_client_settings_are_lines_a_shell_python_and_node_take_as_printed(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line is blank, a comment, an `export`, the server's options or fal.config(...): pasted into a shell,
    nothing is run by mistake; the Python lines in the comments are Python that points fal_client's uploads here."""
    fal_client_module = pytest.importorskip("fal_client.client")
    certs = certificate_paths(tmp_path / "my certs")
    text = client_settings(certs, host="::1", port=8188, prefix="/fal")
    assert text.endswith("\n") and not text.endswith("\n\n")
    lines = text.splitlines()
    assert lines.count("") == 2  # a blank line between the server's, Python's and Node's settings
    exports, python = {}, []
    for line in lines:
        if line.startswith("export "):
            name, _, value = shlex.split(line, comments=True)[1].partition("=")
            exports[name] = value
        elif line.startswith("#   "):
            python.append(line.removeprefix("#   "))
        else:
            assert line == "" or line.startswith(("# ", "--tls-", "fal.config({")), line
    ca = str(certs.ca_cert)
    assert exports == {"FAL_RUN_HOST": "[::1]:8188/fal", "FAL_QUEUE_RUN_HOST": "[::1]:8188/fal/queue",
                       "SSL_CERT_FILE": ca, "FAL_KEY": "any-value", "NODE_EXTRA_CA_CERTS": ca}
    monkeypatch.setattr(fal_client_module, "REST_URL", fal_client_module.REST_URL)
    monkeypatch.setattr(fal_client_module, "CDN_URL", fal_client_module.CDN_URL)
    exec("\n".join(python), {})
    assert (fal_client_module.REST_URL, fal_client_module.CDN_URL) == ("https://[::1]:8188/fal",) * 2


@pytest.mark.parametrize("prefix, base", [("", "https://127.0.0.1:8443"), ("/", "https://127.0.0.1:8443"),
                                          ("//", "https://127.0.0.1:8443"), ("X", "https://127.0.0.1:8443/X"),
                                          ("/XL/", "https://127.0.0.1:8443/XL"),
                                          ("/api/fal/", "https://127.0.0.1:8443/api/fal")])
def test_client_settings_take_any_path_prefix_with_or_without_slashes(tmp_path: Path, prefix: str, base: str) -> None:
    lines = client_settings(certificate_paths(tmp_path), prefix=prefix).splitlines()
    assert f"export FAL_RUN_HOST={base.removeprefix('https://')}" in lines
    assert f'#   fal_client.client.REST_URL = "{base}"' in lines
    assert f'fal.config({{ proxyUrl: {{ url: "{base}/proxy", when: "always" }} }})' in lines


@pytest.mark.parametrize("host, netloc", [("::1", "[::1]:8443"), ("[::1]", "[::1]:8443"), (" ::1 ", "[::1]:8443"),
                                          ("[fe80::1]", "[fe80::1]:8443"), ("localhost", "localhost:8443"),
                                          ("10.0.0.2", "10.0.0.2:8443")])
def test_client_settings_put_ipv6_hosts_in_brackets_once(tmp_path: Path, host: str, netloc: str) -> None:
    lines = client_settings(certificate_paths(tmp_path), host=host).splitlines()
    assert f"export FAL_RUN_HOST={netloc}" in lines
    assert f'#   fal_client.client.CDN_URL = "https://{netloc}"' in lines
