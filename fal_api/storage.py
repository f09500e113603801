"""Uploaded bytes -> image files in the server's uploads folder, served back under an unguessable id until they
expire.

What the clients' upload calls land on (docs/fal-protocol.md). Uploads are the inputs of image-to-image, so only
images are stored: the type is told from the bytes (never from the Content-Type the client sent) and a stored file
is always served back with the fixed type of its format. A file is stored under a random id, never under a name the
client chose (the client's file name appears only, cleaned, in the URL); it is written to a temporary name and
renamed, so no half-written upload is ever served. What the server holds is bounded: each upload by a size limit
(enforced while reading), all of them together by a quota, and the upload slots and CDN tokens it hands out are
signed and carry their own expiry, so handing them out keeps nothing in memory.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .http_limits import Refusal
from .jobs import EXPIRY_INTERVAL_S
from .settings import UPLOAD_QUOTA_MB

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
SLOT_S = 3600.0  # an upload slot (initiate, then one PUT) is good for an hour
# The formats an upload may have, and the one type each is served with (none of them runs script in a browser).
# (MPO: a JPEG that holds more than one picture, as some cameras write; PIL tells it apart.)
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp",
               "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
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


def image_type(data: bytes) -> str:
    """The served type of an uploaded image, told from its header; Refusal (415) for anything else."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            found = img.format
    except Image.DecompressionBombError:
        raise Refusal(413, "the uploaded image has too many pixels to read safely", error_type="too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        found = None
    if found not in IMAGE_TYPES:
        raise Refusal(415, "uploads are input images: png, jpeg, webp, gif, bmp or tiff, told from the bytes (the "
                           "Content-Type sent does not count); this file is none of them",
                      error_type="unsupported_media_type")
    return IMAGE_TYPES[found]


class Signer:
    """Tokens that prove themselves: an expiry time and a random part, signed with a key made at start (a restart
    makes earlier tokens invalid; servers that answer for each other share one key). Nothing is stored per token."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, kind: bytes, body: bytes) -> bytes:
        return hmac.new(self._key, kind + body, hashlib.sha256).digest()[:16]

    def make(self, kind: bytes, expires: float) -> str:
        body = int(expires).to_bytes(5, "big") + secrets.token_bytes(9)
        return base64.urlsafe_b64encode(body + self._mac(kind, body)).decode("ascii")  # 40 characters

    def valid(self, kind: bytes, token: str) -> bool:
        """Signed by this server for `kind` and not expired."""
        if not is_token(token):
            return False
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except ValueError:
            return False
        body, mac = raw[:14], raw[14:]
        return len(raw) == 30 and hmac.compare_digest(mac, self._mac(kind, body)) and \
            int.from_bytes(body[:5], "big") > time.time()


@dataclass
class StoredFile:
    path: Path
    content_type: str
    name: str
    created: float
    size: int = 0


class Uploads:
    """The uploads folder: stored files by id (within a size quota), and the signed upload slots and tokens."""

    def __init__(self, folder: Path, retention_s: float, max_bytes: int = MAX_UPLOAD_BYTES,
                 quota_bytes: int = UPLOAD_QUOTA_MB * 1024 * 1024, signing_key: bytes | None = None) -> None:
        self.folder = folder
        self.retention_s = retention_s
        self.max_bytes = max_bytes
        self.quota_bytes = quota_bytes
        self._files: dict[str, StoredFile] = {}
        self._used = 0  # bytes of the stored files
        self._signer = Signer(signing_key)
        self._lock = threading.Lock()
        self._next_expiry = 0.0

    def prepare(self) -> None:
        """Create the folder; files left from an earlier run have no record and are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for path in self.folder.iterdir():
            if path.is_file() and not path.is_symlink():
                path.unlink()

    def issue_token(self) -> tuple[str, float]:
        expires = time.time() + self.retention_s
        return self._signer.make(b"cdn", expires), expires

    def token_valid(self, token: str) -> bool:
        return self._signer.valid(b"cdn", token)

    def open_slot(self) -> str:
        """A one-time upload slot: its token is also the id the file is stored under."""
        return self._signer.make(b"slot", time.time() + min(SLOT_S, self.retention_s))

    def slot_open(self, token: str) -> bool:
        """A slot this server handed out, not expired, and not used yet."""
        if not self._signer.valid(b"slot", token):
            return False
        with self._lock:
            return token not in self._files and not (self.folder / f".{token}.part").exists()

    def store(self, data: bytes, content_type: str, name: str | None,
              file_id: str | None = None) -> tuple[str, StoredFile]:
        """Writes the bytes under `file_id` (an upload slot's token) or a new id, to be served as `content_type`
        (the routes give image_type's); Refusal when they are too large or over the quota (413), or when the slot
        was used meanwhile (404)."""
        if len(data) > self.max_bytes:
            raise Refusal(413, f"the upload is {len(data)} bytes; this server takes at most {self.max_bytes}",
                          error_type="too_large")
        self.expire()
        with self._lock:
            if self._used + len(data) > self.quota_bytes:
                raise Refusal(413, f"the uploads on this server have reached their quota ({self.quota_bytes} bytes "
                                   f"in all; each is kept {self.retention_s / 3600:g} h): try again later, or ask the "
                                   "operator to raise --upload-quota-mb", error_type="upload_quota")
            self._used += len(data)  # reserved now: two uploads at once cannot both pass the quota
        try:
            file_id = file_id if file_id is not None and is_token(file_id) else new_token()
            path = self.folder / file_id
            partial = self.folder / f".{file_id}.part"
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise Refusal(404, "this upload URL is being used by another upload (each takes one PUT)") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                if path.exists():
                    raise Refusal(404, "no open upload at this URL (each upload URL takes one PUT)")
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        except BaseException:
            with self._lock:
                self._used -= len(data)
            raise
        stored = StoredFile(path, content_type, clean_name(name), time.time(), len(data))
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
            self._used -= sum(f.size for f in dropped)
        for stored in dropped:
            stored.path.unlink(missing_ok=True)
