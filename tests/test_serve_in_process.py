"""`serve` run in the test's own process (standalone/fal_server.py's `serve`, over the demo models): it answers fal's
requests until SIGINT or SIGTERM, only at the address given, prints the settings each client needs (at once, also
to a pipe), bounds its connections (503 past the bound, idle ones and silent TLS handshakes closed), ends waiting
requests cancelled on shutdown (a restart reports them) and cuts off unfinished calls after HANDLERS_STOP_S, exits
143 when the running request does not stop in time, starts again on the port it left, runs `--ray` requests on the
cluster's service (a stand-in here) (tests/test_serve_demo_folders.py: its demo models' folders).

A client thread talks to the server over real sockets and then sends the signal to this process, which the server's
event loop handles (tests/fal_protocol/in_process_serve.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.in_process_serve import (  # noqa: E402
    LONG,
    SMALL,
    T2I,
    call,
    held,
    leave,
    options_for,
    read_all,
    serve_while,
    status_of,
)
from fal_protocol.servers import free_port  # noqa: E402

from comfyui_krea.fal_api.settings import ServiceSettings  # noqa: E402
from comfyui_krea.standalone import fal_server, ray_serve  # noqa: E402
from comfyui_krea.standalone.demo import write_demo_models  # noqa: E402

BUSY_TYPE = "too_many_connections"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_models(tmp_path_factory.mktemp("serve-demo"))


@pytest.fixture
def exits(monkeypatch) -> None:
    """os._exit raises SystemExit(code) instead of ending pytest."""
    monkeypatch.setattr(os, "_exit", leave)


def banner(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_serve_answers_fal_requests_until_ctrl_c_and_prints_each_clients_settings(demo, tmp_path, host_state,
                                                                                   capsys, exits):
    def visit(port: int) -> tuple[tuple[int, dict], bool]:
        try:  # on Linux all of 127/8 is this machine: a server bound to 127.0.0.1 alone is not at 127.0.0.2
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
            elsewhere = True
        except OSError:
            elsewhere = False
        return call(f"http://127.0.0.1:{port}", T2I, {"prompt": "a fox", "seed": 3, **SMALL}), elsewhere

    code, ((status, answer), elsewhere), _ = serve_while(visit, options_for(demo, tmp_path / "out"),
                                                         signum=signal.SIGINT)
    assert code == 0 and status == 200, answer
    assert not elsewhere  # only at the address given
    (image,) = answer["images"]
    assert (image["width"], image["height"]) == (32, 32)
    assert len(list((tmp_path / "out" / "fal").glob("*.jp*g"))) == 1
    port = image["url"].split("/")[2].split(":")[1]
    assert banner(capsys) == [
        f"fal protocol at http://127.0.0.1:{port}  (API key: none (KREA_FAL_API_KEY not set: any key is accepted))",
        f"  Python: FAL_RUN_HOST=127.0.0.1:{port} FAL_QUEUE_RUN_HOST=127.0.0.1:{port}/queue"
        "  (the Python client needs https: give --tls-cert/--tls-key)",
        f'  JS:     fal.config({{ proxyUrl: {{ url: "http://127.0.0.1:{port}/proxy", when: "always" }} }})']


def test_sigterm_cancels_the_waiting_requests_and_interrupts_the_running_one_and_a_restart_reports_them(
        demo, tmp_path, host_state, exits):
    def visit(port: int) -> list[str]:
        base = f"http://127.0.0.1:{port}"
        ids = [call(base, f"queue/{T2I}", {"prompt": "x", **LONG})[1]["request_id"] for _ in range(3)]
        for _ in range(600):  # until the first one runs
            if status_of(base, ids[0])["status"] == "IN_PROGRESS":
                break
            time.sleep(0.05)
        return ids

    options = options_for(demo, tmp_path / "out")
    code, ids, stopping = serve_while(visit, options)
    assert code == 0 and stopping < fal_server.STOP_S
    _, states, _ = serve_while(lambda port: [status_of(f"http://127.0.0.1:{port}", i) for i in ids], options)
    assert [state["status"] for state in states] == ["COMPLETED"] * 3
    assert {state["error_type"] for state in states} == {"request_cancelled"}
    assert "while it ran" in states[0]["error"] and all("shut down" in s["error"] for s in states[1:])


def test_connections_past_the_bound_get_fals_503_and_idle_ones_are_closed(demo, tmp_path, host_state, exits,
                                                                          monkeypatch):
    monkeypatch.setattr(fal_server, "IDLE_TIMEOUT_S", 0.5)

    def visit(port: int) -> dict:
        seen = {}
        open_ = [held(port), socket.create_connection(("127.0.0.1", port))]
        time.sleep(0.05)  # the server sees the second connection
        for over in ("third", "fourth"):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                seen[over] = read_all(sock, 2)
        open_[0].sendall(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # those taken are served
        seen["served"] = read_all(open_[0], 0.2)[0]
        started = time.monotonic()
        seen["idle"] = read_all(open_[1], 3)[1], time.monotonic() - started  # sent nothing at all
        open_[0].close()
        open_[1].close()
        time.sleep(0.05)
        seen["after"] = call(f"http://127.0.0.1:{port}", "fal-ai/flux/requests/0/status")[0]
        return seen

    code, seen, _ = serve_while(visit, options_for(demo, tmp_path / "out", max_connections=2))
    assert code == 0
    for over in ("third", "fourth"):
        answer, closed = seen[over]
        head, _, body = answer.partition(b"\r\n\r\n")
        assert closed and head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error_type"] == BUSY_TYPE, over
    assert seen["served"].startswith(b"HTTP/1.1 404 ")
    idle_closed, after = seen["idle"]
    assert idle_closed and after < 2.0
    assert seen["after"] != 503  # the connections closed, new ones are taken again


def test_over_tls_on_ipv6_clients_trusting_the_ca_are_served_with_the_key_and_silent_handshakes_closed(
        demo, tmp_path, host_state, exits, monkeypatch, capsys):
    pytest.importorskip("cryptography", reason="make-cert needs cryptography: pip install -e '.[serve]'")
    from comfyui_krea.standalone.certificates import make_certificates

    certs = make_certificates(tmp_path / "certs")
    monkeypatch.setattr(fal_server, "IDLE_TIMEOUT_S", 0.5)
    client = ssl.create_default_context(cafile=str(certs.ca_cert))

    def visit(port: int) -> dict:
        base = f"https://[::1]:{port}"
        seen = {"without key": call(base, T2I, {"prompt": "x", **SMALL}, context=client),
                "with key": call(base, T2I, {"prompt": "x", **SMALL}, {"Authorization": "Key k"}, client)}
        with socket.create_connection(("::1", port)) as silent:  # never says hello
            started = time.monotonic()
            closed = read_all(silent, 3)[1]
            seen["silent"] = closed, time.monotonic() - started
        return seen

    options = options_for(demo, tmp_path / "out", service=ServiceSettings(api_key="k"))
    code, seen, _ = serve_while(visit, options, host="::1", tls=fal_server.tls_context(certs.server_cert,
                                                                                       certs.server_key))
    assert code == 0
    assert seen["without key"][0] == 401 and seen["with key"][0] == 200, seen
    closed, after = seen["silent"]
    assert closed and after < 2.0
    lines = banner(capsys)
    port = seen["with key"][1]["images"][0]["url"].split("]:")[1].split("/")[0]
    assert lines[0] == f"fal protocol at https://[::1]:{port}  (API key: set)"
    assert lines[1] == f"  Python: FAL_RUN_HOST=[::1]:{port} FAL_QUEUE_RUN_HOST=[::1]:{port}/queue"
    assert lines[2] == f'  JS:     fal.config({{ proxyUrl: {{ url: "https://[::1]:{port}/proxy", when: "always" }} }})'


def test_serve_ray_serves_through_the_clusters_service_built_from_the_options_and_leaves_it_on_stop(
        demo, tmp_path, host_state, exits, monkeypatch):
    from comfyui_krea.fal_api.routes import FalService
    from comfyui_krea.standalone.runner_backend import RunnerBackend

    asked, left = [], []

    @contextlib.contextmanager
    def cluster(*args) -> Iterator[FalService]:
        """Stands in for the Ray cluster's service: the same protocol over replicas that run the workflows' own
        transformer and save under replicas/ (so the test sees which service ran a request)."""
        asked.append(args)
        backend = RunnerBackend(args[4] / "replicas", None, memory_check=args[5])
        yield FalService.create(backend, args[4] / "fal-uploads", args[1])
        left.append(True)

    monkeypatch.setattr(ray_serve, "ray_service", cluster)
    settings = ServiceSettings(max_queue=5)
    options = options_for(demo, tmp_path / "out", service=settings, memory_check=False, model="other.safetensors",
                          ray=ray_serve.RayOptions(address="auto", replicas=2))
    code, (status, answer), _ = serve_while(lambda port: call(f"http://127.0.0.1:{port}", T2I, {"prompt": "x",
                                                                                                **SMALL}), options)
    assert code == 0 and left == [True]
    assert asked == [(options.ray, settings, demo[0], demo[1], tmp_path / "out", False, "other.safetensors")]
    assert status == 200, answer
    assert len(list((tmp_path / "out" / "replicas" / "fal").glob("*.jp*g"))) == 1
    assert not (tmp_path / "out" / "fal").exists()  # nothing ran on this process's own runner


def test_a_running_request_that_does_not_stop_in_time_ends_the_process_with_143(demo, tmp_path, host_state, exits,
                                                                                 monkeypatch):
    monkeypatch.setattr(fal_server, "STOP_S", 0.0)

    def visit(port: int) -> None:
        base = f"http://127.0.0.1:{port}"
        request_id = call(base, f"queue/{T2I}", {"prompt": "x", **LONG})[1]["request_id"]
        while status_of(base, request_id)["status"] != "IN_PROGRESS":
            time.sleep(0.02)

    try:
        with pytest.raises(SystemExit) as ended:
            serve_while(visit, options_for(demo, tmp_path / "out"))
        assert ended.value.code == 143
    finally:  # the worker stops at its next block; torch must not be torn down under it when pytest exits
        for thread in threading.enumerate():
            if thread.name == "krea-fal-runner":
                thread.join(60)


def test_serve_starts_again_on_the_port_it_left_with_connections_it_closed_still_in_time_wait(demo, tmp_path,
                                                                                           host_state, exits):
    def turned_away(port: int) -> bytes:
        busy = held(port)
        try:  # past the bound of 1: the server answers 503 and closes first, leaving its side in TIME_WAIT
            with socket.create_connection(("127.0.0.1", port)) as sock:
                return read_all(sock, 2)[0]
        finally:
            busy.close()

    port = free_port()
    options = options_for(demo, tmp_path / "out", max_connections=1)
    code, answer, _ = serve_while(turned_away, options, port=port)
    assert code == 0 and answer.startswith(b"HTTP/1.1 503 ")
    code, status, _ = serve_while(lambda port: call(f"http://127.0.0.1:{port}", "fal-ai/flux/requests/0/status")[0],
                                  options, port=port)
    assert code == 0 and status == 404


def test_a_client_still_sending_its_body_when_serve_stops_is_cut_off_after_the_handlers_grace(demo, tmp_path,
                                                                                             host_state, exits,
                                                                                             monkeypatch):
    monkeypatch.setattr(fal_server, "HANDLERS_STOP_S", 0.5)  # the body's own grace is 10 s
    slow: list[socket.socket] = []

    def visit(port: int) -> None:
        sock = held(port)  # a connection the server took, then a request whose body never comes
        sock.sendall(f"POST /{T2I} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{\"prompt\": ".encode())
        slow.append(sock)
        time.sleep(0.2)  # the handler is reading the body

    try:
        code, _, stopping = serve_while(visit, options_for(demo, tmp_path / "out"))
    finally:
        for sock in slow:
            sock.close()
    assert code == 0 and stopping < 5.0


def test_the_settings_reach_a_piped_stdout_while_the_server_runs(demo, tmp_path, host_state, exits, monkeypatch):
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    piped = open(write_end, "w", buffering=8192)  # block-buffered, as Python makes a stdout that is a pipe
    monkeypatch.setattr("sys.stdout", piped)

    def visit(port: int) -> bytes:
        deadline, got = time.monotonic() + 5, b""
        while b"JS:" not in got and time.monotonic() < deadline:
            try:
                got += os.read(read_end, 65536)
            except BlockingIOError:
                time.sleep(0.02)
        return got

    try:
        code, shown, _ = serve_while(visit, options_for(demo, tmp_path / "out"))
    finally:
        monkeypatch.undo()
        piped.close()
        os.close(read_end)
    assert code == 0 and b"fal protocol at http://127.0.0.1:" in shown and b"proxyUrl" in shown
