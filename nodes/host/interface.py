"""What the nodes ask of the place they run in: the Host interface, implemented inside ComfyUI (comfyui_host.py)
and outside it (standalone_host.py), and what it hands back.

A node never asks where it runs; it asks the host for a model file's path, a device, a progress callback, a save
path or a loaded transformer, and each host answers in its own way. The two methods written here
(`model_path`, `save_folder_problem`) are the same for both, built on the host's own answers.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ...model_loader import ModelFileError
from ...sampling.denoise import StepCallback
from .folders import model_name_problem
from .holding import ModelHolding, ModelSlot

WorkCallback = Callable[[int, int], None]  # update(done, total) for work without latents (VAE tiles)


@dataclass(frozen=True)
class LoadedTransformer:
    """A FLUX transformer ready to sample: on its device (resident or partly streamed) with any LoRA applied."""
    module: torch.nn.Module  # the pack's FluxTransformer, or ComfyUI's own FLUX (comfy.ldm.flux.model.Flux)
    device: torch.device
    compute_dtype: torch.dtype
    is_pack_model: bool  # the pack's transformer: step caching and compilation can apply
    streamed: bool  # ComfyUI loaded it partially: some layers fetch their weights on every call


class Host(Protocol):
    """Where the pack runs. `models` keeps the models the handles load (holding.py)."""

    models: ModelHolding

    # -- model files ---------------------------------------------------------------------------------------
    def model_search_paths(self, folder: str) -> list[Path]:
        """The folders searched for model files of `folder` ("diffusion_models", "vae", ...)."""
        ...

    def list_models(self, folder: str) -> list[str]:
        """Model files (relative names, '/'-separated) of one folder; diffusers model folders are listed too."""
        ...

    def find_model(self, folder: str, name: str) -> Path | None:
        """The full path of the model file `name` of `folder`, None when it is in none of its folders."""
        ...

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer folder the user named (None: look beside the model files)."""
        ...

    def shipped_tokenizer_dirs(self) -> dict[str, Path] | None:
        """The CLIP and T5 tokenizer folders the host ships ({"clip": ..., "t5": ...}), searched last."""
        ...

    # -- devices -------------------------------------------------------------------------------------------
    def torch_device(self) -> torch.device:
        """Where the transformer runs."""
        ...

    def model_devices(self, kind: str) -> tuple[torch.device, torch.device]:
        """(where a model of `kind` computes, where its weights wait) for "text_encoder", "vae", "safety_checker"."""
        ...

    def intermediate_device(self) -> torch.device:
        """Where IMAGE and LATENT outputs live between nodes."""
        ...

    # -- progress and cancel -------------------------------------------------------------------------------
    def throw_if_interrupted(self) -> None:
        """Raise when the user cancelled the run."""
        ...

    def block_interrupt_check(self) -> Callable[[], None] | None:
        """What the sampler calls between transformer blocks to stop on Cancel (None: nothing to check)."""
        ...

    def progress_callback(self, total: int, node_id: str | None = None) -> StepCallback:
        """callback(step, total, x0) once per sampler step: progress, latent preview, the interrupt check. x0 is
        the model-space (B, 16, H/8, W/8) prediction of the clean latent."""
        ...

    def work_progress(self, total: int, node_id: str | None = None) -> WorkCallback:
        """update(done, total) for work without latents (VAE tiles): progress and the interrupt check."""
        ...

    # -- saving --------------------------------------------------------------------------------------------
    def output_directory(self) -> Path:
        ...

    def save_image_path(self, filename_prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
        """(folder, filename base, first free counter, subfolder) for saving images with ComfyUI's naming
        (`<prefix>_<counter:05>_`); a prefix that leaves the output folder is refused."""
        ...

    def metadata_enabled(self) -> bool:
        """False when saved images must carry no prompt or workflow (ComfyUI's --disable-metadata)."""
        ...

    # -- the models the loader hands out, and what the pack's nodes do with them ------------------------------
    def transformer_model(self, path: Path, weight_dtype: str, device: torch.device, slot: ModelSlot) -> Any:
        """What KreaModelLoader outputs as MODEL for the transformer file `path`. `slot` is the loader's own (one
        per graph node inside ComfyUI): a host that loads at once keeps the model there by file and dtype, so
        that changing another input of the loader does not load it again."""
        ...

    def text_encoder_model(self, clip_path: Path, t5_path: Path, slot: ModelSlot) -> Any:
        """What KreaModelLoader outputs as CLIP for the CLIP-L and T5-XXL files (`slot` as for the transformer)."""
        ...

    def vae_model(self, path: Path, slot: ModelSlot) -> Any:
        """What KreaModelLoader outputs as VAE for the autoencoder file (`slot` as for the transformer)."""
        ...

    def encode_prompt(self, text_encoder: Any, prompt: str) -> list:
        """CONDITIONING for `prompt` from a CLIP input: T5 reads 512 tokens and CLIP-L 77, tokenized as
        diffusers' FluxPipeline does (fal's exact ids), [[sequence (1, 512, 4096), {"pooled_output": (1, 768)}]]."""
        ...

    def encode_pixels(self, vae: Any, images: torch.Tensor) -> torch.Tensor:
        """IMAGE (B, H, W, 3) in 0..1, sides multiples of 16 -> raw latents (B, 16, H/8, W/8) with a VAE input."""
        ...

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, 16, h, w) -> IMAGE (B, 8h, 8w, 3) float32 in 0..1 on the CPU, with a VAE input."""
        ...

    def loaded_transformer(self, model: Any, latent_shape: tuple[int, ...], extra_bytes: int = 0) -> LoadedTransformer:
        """The transformer of a MODEL input, loaded for sampling `latent_shape` (B, 16, H/8, W/8); `extra_bytes`:
        what the sampler holds beside the host's own estimate (the step cache's residuals)."""
        ...

    # -- services ------------------------------------------------------------------------------------------
    def register_routes(self) -> None:
        """The pack's HTTP routes on the host's server, when it has one (fal's protocol under /fal of ComfyUI's)."""
        ...

    # -- the same for both hosts ---------------------------------------------------------------------------
    def model_path(self, folder: str, name: str) -> Path:
        """The full path of a model file inside the `folder` model folders, or an error listing where it was
        looked for. Names that would leave the folders are refused first (model_name_problem)."""
        problem = model_name_problem(name)
        if problem is not None:
            raise ModelFileError(f"{problem[0].upper()}{problem[1:]}.")
        found = self.find_model(folder, name)
        if found is not None:
            return found
        searched = ", ".join(str(p) for p in self.model_search_paths(folder)) or "(no folder configured)"
        raise ModelFileError(
            f"Model file {name!r} not found. Searched the {folder!r} folders: {searched}. "
            f"Put the file in one of them (or pick another file in the node)."
        )

    def save_folder_problem(self, filename_prefix: str) -> str | None:
        """Why images saved with `filename_prefix` could not be written (None: they can), found before any work:
        a prefix that leaves the output folder, or a folder that cannot be created or written to. Creates
        nothing: the deepest existing folder on the way must be a folder, and one empty temporary file is written
        and removed there to know it is writable (permission bits do not tell, e.g. for root or read-only
        mounts)."""
        try:
            folder = self.save_image_path(filename_prefix, 16, 16)[0]
        except Exception as err:  # ComfyUI's get_save_image_path raises a bare Exception for a prefix outside
            return (f"filename_prefix {filename_prefix!r} cannot be used: {err}. Use a name inside the output "
                    f"folder, e.g. 'krea/krea'.")
        existing = folder.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{existing} is a file, not a folder")
            with tempfile.TemporaryFile(dir=existing, prefix=".krea-check-"):
                pass
        except OSError as err:
            return (f"filename_prefix: images cannot be written to {folder}: {err.strerror or err}. Make the "
                    "output folder a writable folder, or choose another one (--output) or another filename_prefix.")
        return None
