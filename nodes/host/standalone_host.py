"""The host outside ComfyUI (the command line, the fal server, tests): a models folder with ComfyUI's layout, an
output folder, the compute device torch offers, and an interrupt event, all set with `configure`.

The loader's MODEL, CLIP and VAE here are handles that load the pack's own modules on first use, through the one
model cache (standalone_models.py); the MODEL merges the LoRAs its workflow puts in front of the sampler
(LoraLoaderModelOnly).
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...sampling.denoise import StepCallback
from .folders import MODEL_FOLDERS, comfyui_tokenizer_dirs, model_extensions
from .holding import LatestPerKind, ModelSlot
from .interface import Host, LoadedTransformer, WorkCallback
from .standalone_models import TextEncoderHandle, TransformerHandle, VaeHandle, as_handle


class Interrupted(Exception):
    """The run was stopped through the `interrupt` event (the fal server's cancel)."""


@dataclass(frozen=True)
class StandaloneSettings:
    models_dir: Path = Path(os.environ.get("KREA_MODELS_DIR", "models"))
    output_dir: Path = Path(os.environ.get("KREA_OUTPUT_DIR", "output"))
    tokenizer_dir: Path | None = None
    comfyui_dir: Path | None = None  # a ComfyUI folder (the pack in its custom_nodes): its tokenizers, searched last
    progress: StepCallback | None = None  # told of every sampler step (the command line's bar, the fal logs)
    interrupt: threading.Event | None = None  # set: the running workflow stops before the next transformer block
    # The processes that sample each image together (sequence parallelism, sampling/sequence_parallel.py); None: one
    process_group: Any = None


class StandaloneHost(Host):
    """Folders and callbacks set by `configure`; every model stays loaded once used (the latest of each kind)."""

    def __init__(self) -> None:
        self.models = LatestPerKind()
        self._settings = StandaloneSettings()

    def configure(self, models_dir: str | os.PathLike[str] | None = None,
                  output_dir: str | os.PathLike[str] | None = None, progress: StepCallback | None = None,
                  tokenizer_dir: str | os.PathLike[str] | None = None,
                  interrupt: threading.Event | None = None, process_group: Any = None,
                  comfyui_dir: str | os.PathLike[str] | None = None) -> None:
        """Set what is given (None keeps the current setting)."""
        given: dict[str, Any] = {"models_dir": models_dir, "output_dir": output_dir, "tokenizer_dir": tokenizer_dir,
                                 "comfyui_dir": comfyui_dir}
        changes = {name: Path(value) for name, value in given.items() if value is not None}
        for name, value in (("progress", progress), ("interrupt", interrupt), ("process_group", process_group)):
            if value is not None:
                changes[name] = value
        self._settings = dataclasses.replace(self._settings, **changes)

    def settings(self) -> StandaloneSettings:
        """What `configure` set, for `restore` (tests put it back after a run)."""
        return self._settings

    def restore(self, settings: StandaloneSettings) -> None:
        self._settings = settings

    # -- model files ---------------------------------------------------------------------------------------
    def model_search_paths(self, folder: str) -> list[Path]:
        return [self._settings.models_dir.absolute() / sub for sub in MODEL_FOLDERS[folder]]

    def list_models(self, folder: str) -> list[str]:
        names: set[str] = set()
        extensions = model_extensions(folder)
        for root in self.model_search_paths(folder):
            if not root.is_dir():
                continue
            for path in root.rglob("*"):
                if path.is_file() and path.suffix.lower() in extensions:
                    names.add(path.relative_to(root).as_posix())
        return sorted(names)

    def find_model(self, folder: str, name: str) -> Path | None:
        for root in self.model_search_paths(folder):
            candidate = root / name
            if candidate.exists():
                return candidate
        return None

    def tokenizer_dir(self) -> Path | None:
        return self._settings.tokenizer_dir

    def shipped_tokenizer_dirs(self) -> dict[str, Path] | None:
        comfyui_dir = self._settings.comfyui_dir
        return comfyui_tokenizer_dirs(comfyui_dir) if comfyui_dir is not None else None

    # -- devices -------------------------------------------------------------------------------------------
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def model_devices(self, kind: str) -> tuple[torch.device, torch.device]:
        device = self.torch_device()
        return device, device

    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")

    # -- progress and cancel -------------------------------------------------------------------------------
    def throw_if_interrupted(self) -> None:
        event = self._settings.interrupt
        if event is not None and event.is_set():
            event.clear()
            raise Interrupted("the run was cancelled")

    def block_interrupt_check(self) -> Callable[[], None] | None:
        # Without an event nothing can cancel (Ctrl-C raises KeyboardInterrupt between any two operations anyway).
        return self.throw_if_interrupted if self._settings.interrupt is not None else None

    def progress_callback(self, total: int, node_id: str | None = None) -> StepCallback:
        reporter = self._settings.progress

        def report(step: int, total_: int, x0: torch.Tensor) -> None:
            self.throw_if_interrupted()
            if reporter is not None:
                reporter(step, total_, x0)

        return report

    def work_progress(self, total: int, node_id: str | None = None) -> WorkCallback:
        return lambda done, total_: self.throw_if_interrupted()

    def node_report(self, text: str, fields: dict[str, Any]) -> dict[str, list]:
        # The runner hands it to the command line (which prints the text) and to the tests.
        return {"text": [text], "krea_report": [fields]}

    # -- saving --------------------------------------------------------------------------------------------
    def output_directory(self) -> Path:
        return self._settings.output_dir

    def save_image_path(self, filename_prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
        root = self.output_directory().resolve()
        folder = (root / filename_prefix).parent.resolve()
        if folder != root and root not in folder.parents:
            raise ValueError(f"filename_prefix {filename_prefix!r} points outside the output folder {root}.")
        filename = Path(filename_prefix).name
        subfolder = folder.relative_to(root).as_posix() if folder != root else ""
        counter = 1
        if folder.is_dir():
            for existing in folder.iterdir():
                stem = existing.name
                if stem.startswith(filename + "_"):
                    digits = stem[len(filename) + 1:].split("_", 1)[0]
                    if digits.isdigit():
                        counter = max(counter, int(digits) + 1)
        return folder, filename, counter, subfolder

    def metadata_enabled(self) -> bool:
        return True

    # -- the models the loader hands out -------------------------------------------------------------------
    def transformer_model(self, path: Path, weight_dtype: str, device: torch.device,
                          slot: ModelSlot) -> TransformerHandle:
        return TransformerHandle(path, weight_dtype, device)

    def text_encoder_model(self, clip_path: Path, t5_path: Path, slot: ModelSlot) -> TextEncoderHandle:
        return TextEncoderHandle(clip_path, t5_path, self.tokenizer_dir(), self.torch_device(),
                                 self.shipped_tokenizer_dirs())

    def vae_model(self, path: Path, slot: ModelSlot) -> VaeHandle:
        return VaeHandle(path, self.torch_device())

    def encode_prompt(self, text_encoder: Any, prompt: str) -> list:
        return as_handle(text_encoder, TextEncoderHandle, "text_encoder").encode(prompt)

    def encode_pixels(self, vae: Any, images: torch.Tensor) -> torch.Tensor:
        return as_handle(vae, VaeHandle, "vae").encode(images, self.work_progress(1), self.block_interrupt_check())

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return as_handle(vae, VaeHandle, "vae").decode(latents, self.work_progress(1), self.block_interrupt_check())

    def loaded_transformer(self, model: Any, latent_shape: tuple[int, ...], extra_bytes: int = 0) -> LoadedTransformer:
        module = model.load()
        if self._settings.process_group is not None:  # every process of the group samples this image with it
            from ...sampling.sequence_parallel import SequenceParallelFlux

            module = SequenceParallelFlux(module, self._settings.process_group)
        return LoadedTransformer(module=module, device=model.device, compute_dtype=module.compute_dtype,
                                 is_pack_model=True, streamed=False)

    def register_routes(self) -> None:
        return None  # no server here: `python -m comfyui_krea serve` serves fal's protocol
