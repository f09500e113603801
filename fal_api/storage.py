"""Uploaded bytes -> files in the server's uploads folder, served back under an unguessable id until they expire.

What the clients' upload calls land on (docs/fal-protocol.md): a file is stored under a random id,
never under a name the client chose; the client's file name appears only, cleaned, in the URL. A size limit is
enforced while reading, and a file is written to a temporary name and renamed, so no half-written upload is
ever served.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .jobs import EXPIRY_INTERVAL_S

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def is_token(value: str) -> bool:
    """An id of the form `new_token` makes (so a path built from it cannot leave its folder)."""
    return bool(_ID.fullmatch(value))


def new_token() -> str:
    return secrets.token_urlsafe(24)


def clean_name(name: str | None, default: str = "upload.bin") -> str:
    """A file name fit for a URL: its last path part, letters, digits, '.', '-', '_' only."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip("._")[:100]
    return base or default


@dataclass
class StoredFile:
    path: Path
    content_type: str
    name: str
    created: float


class UploadTooLarge(ValueError):
    pass


class Uploads:
    """The uploads folder: stored files by id, pending upload slots (initiate, then PUT), bearer tokens."""

    def __init__(self, folder: Path, retention_s: float, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.folder = folder
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self._files: dict[str, StoredFile] = {}
        self._slots: dict[str, tuple[str, str, float]] = {}  # slot token -> (content type, name, created)
        self._tokens: dict[str, float] = {}  # CDN bearer token -> expiry time
        self._lock = threading.Lock()
        self._next_expiry = 0.0

    def prepare(self) -> None:
        """Create the folder; files left from an earlier run have no record and are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.iterdir():
            if path.is_file() and not path.is_symlink():
                path.unlink()

    def issue_token(self) -> tuple[str, float]:
        token, expires = new_token(), time.time() + self.retention_s
        with self._lock:
            self._tokens[token] = expires
        return token, expires

    def token_valid(self, token: str) -> bool:
        with self._lock:
            return self._tokens.get(token, 0.0) > time.time()

    def open_slot(self, content_type: str, name: str | None) -> str:
        token = new_token()
        with self._lock:
            self._slots[token] = (content_type, clean_name(name), time.time())
        return token

    def take_slot(self, token: str) -> tuple[str, str] | None:
        """The slot's (content type, name), once; None for an unknown or used token."""
        with self._lock:
            slot = self._slots.pop(token, None) if is_token(token) else None
        return None if slot is None else (slot[0], slot[1])

    def store(self, data: bytes, content_type: str, name: str | None,
              file_id: str | None = None) -> tuple[str, StoredFile]:
        """Writes the bytes under `file_id` (an upload slot's token) or a new id."""
        if len(data) > self.max_bytes:
            raise UploadTooLarge(f"the upload is {len(data)} bytes; this server takes at most {self.max_bytes}")
        self.expire()
        file_id = file_id if file_id is not None and is_token(file_id) else new_token()
        path = self.folder / file_id
        partial = self.folder / f".{file_id}.part"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        stored = StoredFile(path, content_type or "application/octet-stream", clean_name(name), time.time())
        with self._lock:
            self._files[file_id] = stored
        return file_id, stored

    def get(self, file_id: str) -> StoredFile | None:
        self.expire()
        with self._lock:
            return self._files.get(file_id) if is_token(file_id) else None

    def expire(self, now: float | None = None) -> None:
        """Forget (and delete) what is past retention; called on every lookup, so it scans once a minute."""
        if now is None:
            now = time.time()
            if now < self._next_expiry:
                return
            self._next_expiry = now + EXPIRY_INTERVAL_S
        with self._lock:
            old = [i for i, f in self._files.items() if now - f.created > self.retention_s]
            dropped = [self._files.pop(i) for i in old]
            for token in [t for t, (_, _, created) in self._slots.items() if now - created > self.retention_s]:
                del self._slots[token]
            for token in [t for t, expires in self._tokens.items() if expires <= now]:
                del self._tokens[token]
        for stored in dropped:
            stored.path.unlink(missing_ok=True)


async def read_limited(content, limit: int) -> bytes:
    """A request body read in chunks, refused as soon as it passes `limit` bytes (never held whole)."""
    chunks, size = [], 0
    async for chunk in content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise UploadTooLarge(f"the upload is over {limit} bytes, the most this server takes")
        chunks.append(chunk)
    return b"".join(chunks)
