"""`python -m comfyui_krea serve` and `make-cert` in-process (standalone/serve_commands.py): which options reach the
server and how (its settings, the address it listens on, its TLS context), which are refused with exit code 2 before
anything starts, and what make-cert writes and prints. The server itself is replaced by a recorder of what it was
asked to serve; tests/test_serve_in_process.py runs the real one."""
from __future__ import annotations

import asyncio
import ssl
import warnings
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")
pytest.importorskip("cryptography", reason="make-cert needs cryptography: pip install -e '.[serve]'")

from cryptography import x509  # noqa: E402

from comfyui_krea.fal_api.settings import API_KEY_ENV, ServiceSettings  # noqa: E402
from comfyui_krea.standalone import cli, fal_server  # noqa: E402
from comfyui_krea.standalone.certificates import make_certificates  # noqa: E402
from comfyui_krea.standalone.fal_server import ServeOptions  # noqa: E402
from comfyui_krea.standalone.ray_serve import RayOptions  # noqa: E402


@pytest.fixture
def served(monkeypatch) -> list[tuple]:
    """What `serve` was asked to serve, (options, host, port, TLS context, demo) per call; nothing is started."""
    calls = []

    def record(options, host_name, port, tls, demo):
        calls.append((options, host_name, port, tls, demo))
        return 0

    monkeypatch.setattr(fal_server, "serve", record)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return calls


def serve(*argv: str) -> int:
    return cli.main(["serve", *argv])


def test_serve_without_options_listens_on_loopback_port_8443_with_fals_limits(served):
    assert serve() == 0
    ((options, host_name, port, tls, demo),) = served
    assert (host_name, port, tls, demo) == ("127.0.0.1", 8443, None, False)
    assert options == ServeOptions(output=Path("output"), service=ServiceSettings(), max_connections=256)
    assert options.memory_check and options.ray is None and options.service.api_key is None


def test_each_serve_option_reaches_the_server(served, monkeypatch, tmp_path):
    monkeypatch.setenv(API_KEY_ENV, "secret")
    assert serve("--host", "Krea.Example.", "--port", "9001", "--models", str(tmp_path / "m"), "--tokenizers",
                 str(tmp_path / "t"), "--model", "flux1-krea-dev-Q8_0.gguf", "--output", str(tmp_path / "o"),
                 "--allow-remote-images", "--allow-remote-loras", "--max-queue", "1", "--retention-hours", "0.5",
                 "--max-megapixels", "0.25", "--no-memory-check", "--upload-quota-mb", "0.5", "--max-connections",
                 "1", "--allowed-host", "proxy.example", "--allowed-host", "KREA.example") == 0
    ((options, host_name, port, tls, demo),) = served
    assert (host_name, port, tls, demo) == ("Krea.Example.", 9001, None, False)
    assert options == ServeOptions(
        output=tmp_path / "o", models=tmp_path / "m", tokenizers=tmp_path / "t", model="flux1-krea-dev-Q8_0.gguf",
        service=ServiceSettings(retention_hours=0.5, max_queue=1, allow_remote_images=True, api_key="secret",
                                allow_remote_loras=True, max_megapixels=0.25, upload_quota_mb=0.5,
                                allowed_hosts=("proxy.example", "krea.example")),
        max_connections=1, memory_check=False)


@pytest.mark.parametrize("bind, given, names", [
    ("127.0.0.1", [], ()),
    ("::", ["a.example"], ("a.example",)),  # an address is no Host name
    ("0.0.0.0", ["a.example,B.example", "b.example"], ("a.example", "b.example")),
    ("krea.lan", [], ("krea.lan",)),  # a bound name is one clients use
    ("krea.lan", ["a.example", "krea.lan"], ("a.example", "krea.lan")),
], ids=["loopback", "any IPv6", "listed twice", "a bound name", "bound and listed"])
def test_the_host_names_taken_are_those_given_and_the_bound_one(served, bind, given, names):
    assert serve("--host", bind, *[arg for name in given for arg in ("--allowed-host", name)]) == 0
    assert served[0][0].service.allowed_hosts == names


def test_demo_is_passed_on_with_its_own_models(served):
    assert serve("--demo") == 0
    options, *_, demo = served[0]
    assert demo is True and options.models is None and options.tokenizers is None


@pytest.mark.parametrize("argv, ray", [
    (["--ray"], RayOptions(address=None, replicas=1)),
    (["--ray", "auto"], RayOptions(address="auto", replicas=1)),
    (["--ray", "ray://head:10001", "--replicas", "3"], RayOptions(address="ray://head:10001", replicas=3)),
    (["--ray", "--replicas", "1"], RayOptions(address=None, replicas=1)),
], ids=["local cluster", "running cluster", "three replicas", "one replica"])
def test_ray_options_reach_the_server(served, argv, ray):
    assert serve(*argv) == 0
    assert served[0][0].ray == ray


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--retention-hours", "0"], "--retention-hours above 0"),
    (["--max-megapixels", "0"], "--max-megapixels and --upload-quota-mb must be above 0"),
    (["--upload-quota-mb", "0"], "--max-megapixels and --upload-quota-mb must be above 0"),
    (["--max-connections", "0"], "--max-connections at least 1"),
    (["--demo", "--models", "m"], "--demo builds its own models"),
    (["--demo", "--tokenizers", "t"], "--demo builds its own models"),
    (["--replicas", "2"], "--replicas goes with --ray"),
    (["--ray", "--replicas", "0"], "must be at least 1"),
], ids=["cert alone", "key alone", "no queue", "no retention", "no pixels", "no upload quota", "no connections",
        "demo and models", "demo and tokenizers", "replicas without ray", "no replicas"])
def test_serve_refuses_options_that_cannot_work_with_exit_2_before_starting(served, capsys, argv, message):
    assert serve(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert served == []


def test_a_missing_server_library_is_exit_2_naming_what_to_install(served, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "comfyui_krea.standalone.fal_server", None)
    assert serve() == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err and served == []


async def _certificate_seen(context: ssl.SSLContext, ca: Path) -> dict:
    """The certificate a client trusting `ca` is shown by a server with `context` (a real TLS handshake)."""
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        client = ssl.create_default_context(cafile=str(ca))
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="127.0.0.1")
        seen = writer.get_extra_info("peercert")
        writer.close()
        return seen
    finally:
        server.close()
        await server.wait_closed()


def test_a_private_tls_key_makes_a_server_that_clients_trusting_the_ca_accept(served, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated TLS set-up would break on a later Python
        assert serve("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)) == 0
    tls = served[0][3]
    assert isinstance(tls, ssl.SSLContext)
    seen = asyncio.run(_certificate_seen(tls, certs.ca_cert))
    assert ("IP Address", "127.0.0.1") in seen["subjectAltName"]


def test_a_tls_key_every_user_can_read_is_refused_and_one_the_group_can_read_warned_about(served, tmp_path, capsys,
                                                                                         caplog):
    certs = make_certificates(tmp_path / "certs")
    certs.server_key.chmod(0o604)
    assert serve("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)) == 2
    err = capsys.readouterr().err
    assert "can be read by every user" in err and f"chmod 600 {certs.server_key}" in err and served == []
    certs.server_key.chmod(0o640)
    assert serve("--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)) == 0
    assert len(served) == 1 and served[0][3] is not None
    assert any("can be read by its group" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def san(path: Path) -> list[str]:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


def test_make_cert_writes_the_named_hosts_certificate_and_prints_the_settings_for_the_first(tmp_path, capsys):
    folder = tmp_path / "certs"
    assert cli.main(["make-cert", str(folder), "--name", "krea.lan", "--name", "10.0.0.7", "--port", "9443",
                     "--prefix", "/fal"]) == 0
    out = capsys.readouterr().out
    assert "FAL_RUN_HOST=krea.lan:9443/fal" in out and "FAL_QUEUE_RUN_HOST=krea.lan:9443/fal/queue" in out
    assert f"SSL_CERT_FILE={folder / 'ca.pem'}" in out
    assert san(folder / "server.pem") == ["krea.lan", "10.0.0.7"]


def test_make_cert_by_default_is_for_this_machine_on_port_8443(tmp_path, capsys):
    folder = tmp_path / "certs"
    assert cli.main(["make-cert", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "FAL_RUN_HOST=127.0.0.1:8443\n" in out and "FAL_QUEUE_RUN_HOST=127.0.0.1:8443/queue" in out
    assert sorted(san(folder / "server.pem")) == sorted(["localhost", "127.0.0.1", "::1"])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["make-cert", str(folder)]) == 2  # never over existing files
    assert "exists" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
