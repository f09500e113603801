"""fal_api.tls_key: a TLS private key that every user of the machine can read is refused, one its group can read
is warned about, and one only its owner can read passes; links are followed, a missing key is left to loading,
and systems without POSIX permissions are not checked. Both servers (`serve` and the pack inside ComfyUI) ask this
at start; what they do with the answer is tests/test_fal_exposure.py and the serve tests.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from comfyui_krea.fal_api import tls_key
from comfyui_krea.fal_api.tls_key import key_exposure

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX permissions")


def _key(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "server-key.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    path.chmod(mode)
    return path


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o620, 0o602, 0o611])
def test_a_key_only_its_owner_can_read_passes(tmp_path: Path, mode: int) -> None:
    assert key_exposure(_key(tmp_path, mode)) is None


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o404, 0o666, 0o777])
def test_a_key_every_user_can_read_is_refused(tmp_path: Path, mode: int) -> None:
    key = _key(tmp_path, mode)
    assert key_exposure(key) == (True, f"the TLS private key {key} can be read by every user of this machine "
                                       f"(mode {mode:o}); make it private first: chmod 600 {key}")


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o440, 0o660])
def test_a_key_its_group_can_read_is_only_warned_about(tmp_path: Path, mode: int) -> None:
    key = _key(tmp_path, mode)
    assert key_exposure(key) == (False, f"the TLS private key {key} can be read by its group (mode {mode:o}); "
                                        f"unless that group is meant to, make it private: chmod 600 {key}")


@posix_only
def test_a_link_is_judged_by_the_key_it_points_to(tmp_path: Path) -> None:
    # certbot's live/ names are links (mode 777 themselves) to keys in archive/.
    key = _key(tmp_path, 0o600)
    link = tmp_path / "privkey.pem"
    link.symlink_to(key)
    assert key_exposure(link) is None
    key.chmod(0o644)
    refuse, why = key_exposure(link) or (False, "")
    assert refuse and "mode 644" in why


def test_a_missing_key_is_left_to_loading(tmp_path: Path) -> None:
    assert key_exposure(tmp_path / "absent.pem") is None


def test_systems_without_posix_permissions_are_not_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _key(tmp_path, 0o644)
    monkeypatch.setattr(tls_key.os, "name", "nt")  # Windows reports mode 666 for every file it can read
    assert key_exposure(key) is None
