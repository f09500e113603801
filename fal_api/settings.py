"""The fal server's settings and their defaults, one table for both servers (`serve` and the routes inside
ComfyUI) and for the command line's options and help.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PORT = 8443  # `serve`'s port, and the one make-cert's printed settings name unless told another
RETENTION_HOURS = 24.0  # how long results, uploads and request records stay available after a request ends
MAX_QUEUE = 32  # requests waiting or running at most; more are answered 503

# The largest image one request may make, in fal's megapixels (1024 x 1024 pixels: fal bills per such megapixel
# and states "up to 4 megapixels"): 4 allows 2048 x 2048. Image-to-image makes the input's size, so it bounds inputs.
MEGAPIXEL = 1024 * 1024
MAX_MEGAPIXELS = 4.0
UPLOAD_QUOTA_MB = 1024  # all uploads kept at once, in MiB (32 uploads of the largest size)
MAX_CONNECTIONS = 256  # `serve`: open connections at most; more are answered 503 and closed
# A LoRA fetched from a URL (remote LoRAs allowed): at most this large (FLUX LoRAs of rank 128 are about 1.3 GB),
# and fetched within this time.
MAX_LORA_MB = 2048
LORA_FETCH_TIMEOUT_S = 600.0

# Bodies: past the first BODY_GRACE_S seconds, a body must keep arriving at BODY_MIN_RATE bytes per second on
# average (a 1 MB body trickled a byte at a time is cut off after the grace), else 408 and the connection closes.
BODY_GRACE_S = 10.0
BODY_MIN_RATE = 32 * 1024
# `serve`: a connection with no request in progress (idle, or still sending its headers) is closed after this, and
# a TLS handshake must end within it.
IDLE_TIMEOUT_S = 15.0

# Environment variables: the API key (both servers), and inside ComfyUI, which has no options of the pack's own,
# the settings `serve` takes as options.
API_KEY_ENV = "KREA_FAL_API_KEY"
RETENTION_ENV = "KREA_FAL_RETENTION_HOURS"
MAX_QUEUE_ENV = "KREA_FAL_MAX_QUEUE"
REMOTE_IMAGES_ENV = "KREA_FAL_REMOTE_IMAGES"
REMOTE_LORAS_ENV = "KREA_FAL_REMOTE_LORAS"
MAX_MEGAPIXELS_ENV = "KREA_FAL_MAX_MEGAPIXELS"
UPLOAD_QUOTA_ENV = "KREA_FAL_UPLOAD_QUOTA_MB"
ALLOWED_HOSTS_ENV = "KREA_FAL_ALLOWED_HOSTS"  # comma-separated host names


def truthy(value: str | None) -> bool:
    """An environment or query flag: "1", "true" or "yes" (any case)."""
    return (value or "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ServiceSettings:
    retention_hours: float = RETENTION_HOURS
    max_queue: int = MAX_QUEUE
    allow_remote_images: bool = False  # fetch image_url from other hosts (never from private addresses)
    allow_remote_loras: bool = False  # LoRAs by URL or Hugging Face name (never from private addresses)
    api_key: str | None = None  # required as `Authorization: Key <it>` when set
    max_megapixels: float = MAX_MEGAPIXELS
    upload_quota_mb: float = UPLOAD_QUOTA_MB
    # Host names the Host header may carry besides IP addresses and localhost (a DNS name, a reverse proxy's).
    allowed_hosts: tuple[str, ...] = ()

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * MEGAPIXEL)

    @property
    def upload_quota_bytes(self) -> int:
        return int(self.upload_quota_mb * 1024 * 1024)

    @classmethod
    def from_environment(cls) -> ServiceSettings:
        """Inside ComfyUI: the settings from the environment variables above; ValueError naming the variable when
        one is not a number above 0."""
        return cls(retention_hours=env_number(RETENTION_ENV, RETENTION_HOURS),
                   max_queue=int(env_number(MAX_QUEUE_ENV, MAX_QUEUE, whole=True)),
                   allow_remote_images=truthy(os.environ.get(REMOTE_IMAGES_ENV)), api_key=api_key_from_env(),
                   allow_remote_loras=truthy(os.environ.get(REMOTE_LORAS_ENV)),
                   max_megapixels=env_number(MAX_MEGAPIXELS_ENV, MAX_MEGAPIXELS),
                   upload_quota_mb=env_number(UPLOAD_QUOTA_ENV, UPLOAD_QUOTA_MB),
                   allowed_hosts=host_list(os.environ.get(ALLOWED_HOSTS_ENV, "")))


def env_number(name: str, default: float, whole: bool = False) -> float:
    """The environment variable `name` as a number above 0 (`default` when unset)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        value = 0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={text[:50]!r} is not a {'whole ' if whole else ''}number above 0")
    return value


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def host_list(value: str) -> tuple[str, ...]:
    """"a.example, B.example" -> ("a.example", "b.example")."""
    return tuple(name.strip().lower().rstrip(".") for name in value.split(",") if name.strip())
