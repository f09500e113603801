"""A TLS private key file -> whether other users of this machine can read it (both servers check at start).

A key that every user can read is refused by `serve` (and warned about inside ComfyUI, whose server loads it): anyone
on the machine could then impersonate the server. A key readable by its group is only warned about, since some
setups share keys through a group on purpose (e.g. ssl-cert). Systems without POSIX permissions are not checked.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def key_exposure(path: Path) -> tuple[bool, str] | None:
    """(refuse, why) when others can read the key at `path`; None when only its owner can (or it cannot be told).
    Follows links (certbot's live/ names are links to the keys)."""
    if os.name != "posix":
        return None
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None  # loading it says what is wrong
    if mode & stat.S_IROTH:
        return True, (f"the TLS private key {path} can be read by every user of this machine (mode {mode:o}); "
                      f"make it private first: chmod 600 {path}")
    if mode & stat.S_IRGRP:
        return False, (f"the TLS private key {path} can be read by its group (mode {mode:o}); unless that group is "
                       f"meant to, make it private: chmod 600 {path}")
    return None
