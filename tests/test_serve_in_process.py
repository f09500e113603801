"""`serve` run in the test's own process (standalone/fal_server.py's `serve`, over the demo models): it answers fal's
requests until SIGINT or SIGTERM, only at the address given, prints the settings each client needs (at once, also
to a pipe), bounds its connections (503 past the bound, idle ones and silent TLS handshakes closed), ends waiting
requests cancelled on shutdown (a restart reports them) and cuts off unfinished calls after HANDLERS_STOP_S, exits
143 when the running request does not stop in time, starts again on the port it left, runs `--ray` requests on the
cluster's service (a stand-in here), and keeps no demo folder behind (nor one a killed server left).

A client thread talks to the server over real sockets and then sends the signal to this process, which the server's
event loop handles; the previous signal handlers are put back after each test.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.servers import free_port  # noqa: E402

from comfyui_krea.fal_api.settings import ServiceSettings  # noqa: E402
from comfyui_krea.standalone import fal_server, ray_serve  # noqa: E402
from comfyui_krea.standalone.demo import write_demo_models  # noqa: E402
from comfyui_krea.standalone.fal_server import DEMO_PREFIX, ServeOptions  # noqa: E402

T2I = "fal-ai/flux/krea"
SMALL = {"image_size": {"width": 32, "height": 32}, "num_inference_steps": 1}
LONG = {"image_size": {"width": 1024, "height": 1024}, "num_inference_steps": 50}
BUSY_TYPE = "too_many_connections"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    return write_demo_models(tmp_path_factory.mktemp("serve-demo"))


@pytest.fixture
def exits(monkeypatch) -> None:
    """os._exit raises SystemExit(code) instead of ending pytest."""
    def leave(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", leave)


def call(base: str, path: str, body: dict | None = None, headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def serve_while(visit: Callable[[int], object], options: ServeOptions, host: str = "127.0.0.1",
                tls: ssl.SSLContext | None = None, demo: bool = False, signum: int = signal.SIGTERM,
                port: int | None = None) -> tuple[int, object, float]:
    """Run `serve` here until `visit(port)`, run by a client thread once the port takes connections, has returned
    and `signum` reached this process: (serve's exit code, what visit returned, seconds from the signal to the
    return). Whatever visit raised is raised here; when the port takes no connection within a minute, the signal
    is sent all the same."""
    port = port or free_port()
    done = threading.Event()
    outcome: dict = {}
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

    def client() -> None:
        try:
            deadline = time.monotonic() + 60
            while not done.is_set():
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            else:
                return
            time.sleep(0.05)  # the server sees the probe's connection close
            outcome["value"] = visit(port)
        except BaseException as err:  # noqa: BLE001 - raised again in the test's thread
            outcome["error"] = err
        finally:
            if not done.is_set():
                outcome["signalled"] = time.monotonic()
                os.kill(os.getpid(), signum)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        code = fal_server.serve(options, host, port, tls, demo)
    finally:
        returned = time.monotonic()
        signal.signal(signal.SIGTERM, lambda *_: None)  # the loop left SIG_DFL: no late signal may end pytest
        done.set()
        thread.join(60)
        for number, handler in previous.items():
            signal.signal(number, handler)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome.get("value"), returned - outcome.get("signalled", returned)


def options_for(demo: tuple[Path, Path], output: Path, **changes) -> ServeOptions:
    return ServeOptions(output=output, models=demo[0], tokenizers=demo[1], **changes)


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


def status_of(base: str, request_id: str) -> dict:
    return call(base, f"queue/fal-ai/flux/requests/{request_id}/status")[1]


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


def read_all(sock: socket.socket, seconds: float) -> tuple[bytes, bool]:
    """What the server sends on `sock` within `seconds`, and whether it closed the connection by then."""
    sock.settimeout(0.05)
    deadline, got = time.monotonic() + seconds, b""
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return got, True
        if not chunk:
            return got, True
        got += chunk
    return got, False


def held(port: int) -> socket.socket:
    """A keep-alive connection the server took (answered 404 to a request), kept open; it retries while the
    server still counts a connection just closed (the probe's) against the bound."""
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        if answer.startswith(b"HTTP/1.1 404 "):
            return sock
        sock.close()
        time.sleep(0.05)
    raise AssertionError(f"the server took no connection: {answer!r}")


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


def test_demo_serves_models_from_a_temporary_folder_removed_on_stop_and_stale_ones_go_at_start(tmp_path, host_state,
                                                                                              exits, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"{DEMO_PREFIX}999999999-left"  # no such process
    stale.mkdir()
    mine = tmp_path / f"{DEMO_PREFIX}{os.getpid()}-running"  # this process is alive
    mine.mkdir()

    def visit(port: int) -> tuple[list[Path], tuple[int, dict]]:
        folders = sorted(tmp_path.glob(DEMO_PREFIX + "*"))
        return folders, call(f"http://127.0.0.1:{port}", T2I, {"prompt": "x", **SMALL})

    code, (folders, (status, answer)), _ = serve_while(visit, ServeOptions(output=tmp_path / "out"), demo=True)
    assert code == 0 and status == 200, answer
    assert stale not in folders and mine in folders and len(folders) == 2
    (made,) = set(folders) - {mine}
    assert made.name.startswith(f"{DEMO_PREFIX}{os.getpid()}-")
    assert sorted(tmp_path.glob(DEMO_PREFIX + "*")) == [mine]


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


def test_stale_demo_folders_are_removed_only_when_this_users_server_is_gone(tmp_path, monkeypatch):
    gone = "999999999"
    folders = {name: tmp_path / f"{DEMO_PREFIX}{name}" for name in (
        f"{gone}-a", f"{gone}-a-b", f"{os.getpid()}-b", "nopid-c", "-e", f"{gone}{gone}{gone}-huge")}
    for path in folders.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"x")
    others = tmp_path / f"{DEMO_PREFIX}{gone}-other-user"
    others.mkdir()
    os.chown(others, os.getuid() + 1, os.getgid())
    linked = tmp_path / f"{DEMO_PREFIX}{gone}-link"
    linked.symlink_to(folders[f"{os.getpid()}-b"])
    unrelated = tmp_path / f"other-{gone}-a"
    unrelated.mkdir()
    a_file = tmp_path / f"{DEMO_PREFIX}{gone}-file"
    a_file.write_bytes(b"x")

    fal_server.remove_stale_demo_folders(tmp_path)
    removed = {f"{gone}-a", f"{gone}-a-b", f"{gone}{gone}{gone}-huge"}  # the last past any process id
    assert not any(folders[name].exists() for name in removed)
    assert all(folders[name].is_dir() for name in folders if name not in removed)
    assert others.is_dir() and linked.is_symlink() and unrelated.is_dir() and a_file.is_file()


def test_a_demo_folder_of_a_process_of_another_user_is_kept(tmp_path, monkeypatch):
    pid = 999999998
    path = tmp_path / f"{DEMO_PREFIX}{pid}-x"
    path.mkdir()
    real_kill = os.kill

    def kill(target: int, signum: int) -> None:  # as for a non-root user: another user's process is not ours to signal
        if target == pid:
            raise PermissionError(1, "Operation not permitted")
        real_kill(target, signum)

    monkeypatch.setattr(os, "kill", kill)
    fal_server.remove_stale_demo_folders(tmp_path)
    assert path.is_dir()


def test_a_stale_demo_folder_that_cannot_be_removed_is_left_and_does_not_stop_the_start(tmp_path):
    base = Path(tempfile.mkdtemp())  # /tmp/tmpXXX: others may pass /tmp, unlike pytest's own folders
    try:
        base.chmod(0o755)
        stale = base / f"{DEMO_PREFIX}999999999-x"
        (stale / "sub").mkdir(parents=True)
        (stale / "sub" / "model.safetensors").write_bytes(b"x")
        if os.geteuid() == 0:  # root removes anything: act as a user who may not (the real uid, the owner, stays)
            os.seteuid(65534)
            try:
                fal_server.remove_stale_demo_folders(base)
            finally:
                os.seteuid(0)
        else:
            (stale / "sub").chmod(0o500)
            fal_server.remove_stale_demo_folders(base)
            (stale / "sub").chmod(0o700)
        assert (stale / "sub" / "model.safetensors").is_file()
    finally:
        shutil.rmtree(base)


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
