"""A request's `loras` ([{path, scale}]) -> (file name in the loras folder, strength) pairs for LoraLoaderModelOnly
nodes, each file checked as a FLUX LoRA that fits the workflow's base transformer, before the request is queued.

`path` is one of:
- a file name in the server's loras folder ("style.safetensors", "krea/style.safetensors"), confined to it like
  every model name: an absolute path or a '..' step is refused;
- an http(s) URL, only when the operator allows remote LoRAs: fetched once through the address guard (public
  addresses only, pinned; remote_fetch.py) under a size and a time limit into a content-addressed cache inside the
  loras folder (CACHE_FOLDER/<sha256 of the file>.safetensors, found again by the URL's own hash in
  CACHE_FOLDER/urls/), written under a temporary name and renamed only once its header proved it a LoRA;
- a Hugging Face repository ("owner/name", or "owner/name/file.safetensors"), only when the operator allows remote
  LoRAs and huggingface_hub is installed: huggingface_hub names the file and its download URL, which is then fetched
  and cached like any URL.

Every refusal is a 422 on ["body", "loras", i, "path"]: a name that leaves the folder or names no file, a URL this
server may not or cannot fetch (private address, too large by its Content-Length or its bytes, too slow), a pickle,
a truncated or damaged header, a model instead of a LoRA, a LoRA of another architecture or of other widths than the
base transformer.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..model_loader import ModelFileError
from ..model_loader.flux import FluxConfig, config_from_checkpoint
from ..model_loader.lora import plan_lora, read_lora
from .remote_fetch import FetchLimits, RemoteImageError, fetch_to_file
from .schema import InputError, LoraWeight
from .settings import LORA_FETCH_TIMEOUT_S, MAX_LORA_MB, REMOTE_LORAS_ENV
from .storage import new_token

log = logging.getLogger(__name__)

CACHE_FOLDER = "fal-cache"  # inside the loras folder: <sha256>.safetensors, and urls/<sha256 of the URL>
# owner/name or owner/name/path/file.safetensors: Hugging Face's repository ids are letters, digits, - _ and .
HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.safetensors)?$")
LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors",)  # diffusers' name, taken when a repository has several

FetchToFile = Callable[[str, Path], Awaitable[str]]  # (url, new file) -> its sha256
# "owner/name" or "owner/name/file" -> the download URL of the repository's LoRA file (huggingface_hub)
HfResolve = Callable[[str], Awaitable[str]]
# A name in a model folder -> its file (None: no such file); ValueError when the name leaves the folder
ModelFile = Callable[[str], Path | None]
BASE_LOADERS = ("KreaModelLoader",)  # the node whose model_name is the base transformer LoRAs are checked against


def base_config(prompt: dict, model_file: Callable[[str, str], Path | None]) -> FluxConfig | None:
    """The config of the workflow's base transformer, from its file's header (None: not known here; what cannot
    load is the backend's validation to refuse)."""
    for node in prompt.values():
        name = node.get("inputs", {}).get("model_name") if node.get("class_type") in BASE_LOADERS else None
        if isinstance(name, str):
            try:
                path = model_file("diffusion_models", name)
                return config_from_checkpoint(path) if path is not None else None
            except (ValueError, ModelFileError, OSError):
                return None
    return None


def lora_error(index: int, message: str, value: object = None) -> InputError:
    return InputError([{"type": "value_error", "loc": ["body", "loras", index, "path"], "msg": message,
                        "input": value}])


def lora_fetch_limits() -> FetchLimits:
    return FetchLimits(max_bytes=MAX_LORA_MB * 1024 * 1024, timeout_s=LORA_FETCH_TIMEOUT_S)


async def guarded_fetch_to_file(url: str, destination: Path) -> str:
    return await fetch_to_file(url, destination, limits=lora_fetch_limits())


async def huggingface_url(name: str) -> str:
    """The download URL of the LoRA file of the Hugging Face repository `name` (owner/repo[/file.safetensors]); a
    repository with several .safetensors files must be named with its file. ValueError for what cannot be resolved."""
    try:
        import huggingface_hub
    except ImportError:
        raise ValueError("Hugging Face names need huggingface_hub on this server (pip install "
                         "'comfyui-krea[hf]'); or give the LoRA's URL") from None
    owner, repo, *rest = name.split("/")
    repo_id, filename = f"{owner}/{repo}", "/".join(rest) or None
    if filename is None:
        try:
            files = await asyncio.to_thread(huggingface_hub.list_repo_files, repo_id)
        except Exception as err:  # huggingface_hub's errors: not found, gated, offline, ...
            raise ValueError(f"Hugging Face repository {repo_id!r} could not be read: {type(err).__name__}: "
                             f"{str(err)[:200]}") from None
        weights = [f for f in files if f.endswith(".safetensors")]
        preferred = [f for f in weights if f.rsplit("/", 1)[-1] in LORA_FILE_NAMES]
        if len(weights) == 1 or len(preferred) == 1:
            filename = (preferred or weights)[0]
        else:
            raise ValueError(f"Hugging Face repository {repo_id!r} has {len(weights)} .safetensors files"
                             f"{' (' + ', '.join(weights[:5]) + ')' if weights else ''}: name one, as "
                             f"{repo_id}/<file>.safetensors")
    return huggingface_hub.hf_hub_url(repo_id, filename)


@dataclass
class LoraSources:
    """Where a server's LoRAs come from: its loras folder, and (when allowed) URLs and Hugging Face names."""
    folder: Path  # the loras folder that holds the cache (the first one, where there are several)
    model_file: ModelFile
    allow_remote: bool = False
    fetch: FetchToFile = guarded_fetch_to_file
    hf_resolve: HfResolve = huggingface_url
    _fetching: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    @property
    def cache(self) -> Path:
        return self.folder / CACHE_FOLDER

    async def resolve(self, loras: Sequence[LoraWeight], base: FluxConfig | None) -> list[tuple[str, float]]:
        """(name in the loras folder, scale) per LoRA, in order, each checked against `base` (None: the base is
        unknown here, and only the LoRA's own header is checked)."""
        resolved = []
        for index, lora in enumerate(loras):
            name = await self._name(index, lora.path)
            path = self.model_file(name)
            if path is None:  # a cached file removed meanwhile
                raise lora_error(index, f"the LoRA {lora.path[:200]!r} is gone from the loras folder", lora.path[:200])
            try:
                checked = read_lora(path)
                if base is not None:
                    plan_lora(checked, base)
            except ModelFileError as err:
                raise lora_error(index, _without_folder(str(err), path, lora.path), lora.path[:200]) from None
            resolved.append((name, lora.scale))
        return resolved

    async def _name(self, index: int, path: str) -> str:
        """The name in the loras folder that `path` comes to (fetching it first when it is remote)."""
        scheme = path.split("://", 1)[0].lower() if "://" in path else None
        if scheme in ("http", "https"):
            self._require_remote(index, path, "URLs")
            return await self._cached(index, path)
        if scheme is not None:
            raise lora_error(index, f"a LoRA path is a file name in the loras folder, an http(s) URL or a Hugging "
                                    f"Face name; {scheme}:// is none of them", path[:200])
        try:
            found = self.model_file(path)
        except ValueError as err:
            raise lora_error(index, str(err), path[:200]) from None
        if found is not None:
            return path
        if HF_NAME.match(path) and ".." not in path.split("/"):
            self._require_remote(index, path, "Hugging Face names")
            try:
                url = await self.hf_resolve(path)
            except ValueError as err:
                raise lora_error(index, str(err), path) from None
            return await self._cached(index, url)
        raise lora_error(index, f"no LoRA named {path[:200]!r} in this server's loras folder (names are relative "
                                "to it, e.g. 'style.safetensors')", path[:200])

    def _require_remote(self, index: int, path: str, what: str) -> None:
        if not self.allow_remote:
            raise lora_error(index, f"this server takes LoRAs from its loras folder only, not {what}: put the file "
                                    "there and give its name; the operator can allow remote LoRAs with "
                                    f"--allow-remote-loras ({REMOTE_LORAS_ENV}=1 inside ComfyUI)", path[:200])

    async def _cached(self, index: int, url: str) -> str:
        """The cached file of `url` ("fal-cache/<sha256>.safetensors"), fetched now when it is not there yet."""
        by_url = self.cache / "urls" / hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()
        name = _cached_name(by_url, self.cache)
        if name is not None:
            return name
        async with self._fetching:  # one download at a time: a URL asked for twice at once is fetched once
            name = _cached_name(by_url, self.cache)
            if name is not None:
                return name
            by_url.parent.mkdir(parents=True, exist_ok=True)
            part = self.cache / f".part-{new_token()}"
            try:
                digest = await self.fetch(url, part)
                try:  # the header, before the file takes its name: a pickle or a model never lands in the cache
                    read_lora(part)
                except ModelFileError as err:
                    raise lora_error(index, _without_folder(str(err), part, url[:200]), url[:200]) from None
                blob = self.cache / f"{digest}.safetensors"
                if blob.is_file():
                    part.unlink()
                else:
                    os.replace(part, blob)
                _write_atomically(by_url, digest)
            except RemoteImageError as err:
                raise lora_error(index, str(err).replace("image_url", "the LoRA URL"), url[:200]) from None
            finally:
                part.unlink(missing_ok=True)
            log.info("fal: LoRA %s fetched into %s", url[:200], blob)
            return f"{CACHE_FOLDER}/{digest}.safetensors"


def _cached_name(by_url: Path, cache: Path) -> str | None:
    try:
        digest = by_url.read_text().strip()
    except OSError:
        return None
    if not re.fullmatch(r"[0-9a-f]{64}", digest) or not (cache / f"{digest}.safetensors").is_file():
        return None
    return f"{CACHE_FOLDER}/{digest}.safetensors"


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(f".{path.name}.{new_token()}")
    part.write_text(text)
    os.replace(part, path)


def _without_folder(message: str, path: Path, shown: str) -> str:
    """A loader's message about `path`, naming the LoRA as the client gave it: the server's folders stay private."""
    return message.replace(str(path), repr(shown[:200]))
