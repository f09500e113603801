"""The fal server's settings and their defaults, one table for both servers (`serve` and the routes inside
ComfyUI) and for the command line's options and help.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_PORT = 8443  # `serve`'s port, and the one make-cert's printed settings name unless told another
RETENTION_HOURS = 24.0  # how long results, uploads and request records stay available after a request ends
MAX_QUEUE = 32  # requests waiting or running at most; more are answered 503

# Environment variables: the API key (both servers), and inside ComfyUI, which has no options of the pack's own,
# the settings `serve` takes as options.
API_KEY_ENV = "KREA_FAL_API_KEY"
RETENTION_ENV = "KREA_FAL_RETENTION_HOURS"
MAX_QUEUE_ENV = "KREA_FAL_MAX_QUEUE"
REMOTE_IMAGES_ENV = "KREA_FAL_REMOTE_IMAGES"


def truthy(value: str | None) -> bool:
    """An environment or query flag: "1", "true" or "yes" (any case)."""
    return (value or "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ServiceSettings:
    retention_hours: float = RETENTION_HOURS
    max_queue: int = MAX_QUEUE
    allow_remote_images: bool = False  # fetch image_url from other hosts (never from private addresses)
    api_key: str | None = None  # required as `Authorization: Key <it>` when set

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600

    @classmethod
    def from_environment(cls) -> ServiceSettings:
        """Inside ComfyUI: the settings from the environment variables above."""
        return cls(retention_hours=float(os.environ.get(RETENTION_ENV, str(RETENTION_HOURS))),
                   max_queue=int(os.environ.get(MAX_QUEUE_ENV, str(MAX_QUEUE))),
                   allow_remote_images=truthy(os.environ.get(REMOTE_IMAGES_ENV)), api_key=api_key_from_env())


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
