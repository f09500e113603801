"""`serve --demo`'s models folder (standalone/fal_server.py): the demo models are written to a temporary folder named
after the server's process, served from there and removed when serve stops; at start, folders that servers killed
with SIGKILL left behind are removed (only this user's, only when their process is gone, never following a link),
and one that cannot be removed does not stop the start.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the fal server needs aiohttp and pydantic: pip install -e '.[serve]'")

from fal_protocol.in_process_serve import SMALL, T2I, call, leave, serve_while  # noqa: E402

from comfyui_krea.standalone import fal_server  # noqa: E402
from comfyui_krea.standalone.fal_server import DEMO_PREFIX, ServeOptions  # noqa: E402


@pytest.fixture
def exits(monkeypatch) -> None:
    """os._exit raises SystemExit(code) instead of ending pytest."""
    monkeypatch.setattr(os, "_exit", leave)


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
