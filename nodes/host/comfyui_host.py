"""The host inside ComfyUI: its folders (folder_paths), devices and memory management (comfy.model_management),
ComfyUI's own MODEL, CLIP and VAE types for the loader's outputs, progress bars and previews, save paths,
--disable-metadata, and its HTTP server for fal's routes.

Imported only when ComfyUI's modules are importable (nodes/host/__init__.py); with comfyui_models.py and
fal_queue.py, the only code of the pack that imports ComfyUI.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comfy.model_management as model_management  # type: ignore[import-not-found]
import comfy.utils as comfy_utils  # type: ignore[import-not-found]
import folder_paths  # type: ignore[import-not-found]
import torch
from tqdm import tqdm  # a requirement of ComfyUI's, used for its samplers' terminal bars

from ...model_loader.text_encoders import load_clip_tokenizer, load_t5_tokenizer
from ...model_loader.text_encoders.tokenization import FixedLengthTokenizer
from ...sampling.denoise import StepCallback
from . import comfyui_models
from .folders import GGUF_EXTENSIONS, GGUF_FOLDERS, MODEL_EXTENSIONS, comfyui_tokenizer_dirs
from .holding import ModelSlot, UnderPatchers, cached_load, file_key, kept
from .interface import REPORT_EVENT, Host, LoadedTransformer, WorkCallback

StepListener = Callable[[str, int, int, torch.Tensor], None]  # (prompt id, step, total, x0 in model space)


def _gguf_key(folder: str) -> str:
    return f"krea_gguf_{folder}"


class ComfyHost(Host):
    """ComfyUI's answers; the models the handles load live under ModelPatchers that ComfyUI manages."""

    def __init__(self) -> None:
        self.models = UnderPatchers(comfyui_models.managed_model, comfyui_models.load_for_use, self.model_devices)
        self._step_listeners: list[StepListener] = []
        # Register models/safety_checker, keeping folders that extra_model_paths.yaml may have added already
        # (those come with an empty extension set, which would list config.json files too).
        paths = folder_paths.folder_names_and_paths.get("safety_checker", ([], set()))[0]
        default = os.path.join(folder_paths.models_dir, "safety_checker")
        folder_paths.folder_names_and_paths["safety_checker"] = (
            [*paths, default] if default not in paths else paths, set(MODEL_EXTENSIONS))
        # GGUF files in the same folders, under a key of our own: ComfyUI's own loaders keep their lists (they
        # cannot read GGUF). The folder list is ComfyUI's own list object, so folders added later count too.
        for folder in GGUF_FOLDERS:
            folder_paths.folder_names_and_paths[_gguf_key(folder)] = (
                folder_paths.folder_names_and_paths[folder][0], set(GGUF_EXTENSIONS))

    # -- model files ---------------------------------------------------------------------------------------
    def model_search_paths(self, folder: str) -> list[Path]:
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]

    def list_models(self, folder: str) -> list[str]:
        names = list(folder_paths.get_filename_list(folder))
        if folder in GGUF_FOLDERS:
            names = sorted({*names, *folder_paths.get_filename_list(_gguf_key(folder))})
        return names

    def find_model(self, folder: str, name: str) -> Path | None:
        found = folder_paths.get_full_path(folder, name)  # any extension: a GGUF file too, without its own key
        return Path(found) if found is not None else None

    def tokenizer_dir(self) -> Path | None:
        return None

    def shipped_tokenizer_dirs(self) -> dict[str, Path] | None:
        return comfyui_tokenizer_dirs(Path(comfy_utils.__file__).resolve().parent.parent)  # ComfyUI/comfy/utils.py

    # -- devices -------------------------------------------------------------------------------------------
    def torch_device(self) -> torch.device:
        return model_management.get_torch_device()

    def model_devices(self, kind: str) -> tuple[torch.device, torch.device]:
        """ComfyUI's devices for its own models of that kind."""
        return {
            "text_encoder": (model_management.text_encoder_device(), model_management.text_encoder_offload_device()),
            "vae": (model_management.vae_device(), model_management.vae_offload_device()),
            "safety_checker": (model_management.get_torch_device(), model_management.unet_offload_device()),
        }[kind]

    def intermediate_device(self) -> torch.device:
        return model_management.intermediate_device()

    # -- progress and cancel -------------------------------------------------------------------------------
    def throw_if_interrupted(self) -> None:
        model_management.throw_exception_if_processing_interrupted()

    def block_interrupt_check(self) -> Callable[[], None] | None:
        return model_management.throw_exception_if_processing_interrupted

    def progress_callback(self, total: int, node_id: str | None = None) -> StepCallback:
        """A progress bar, a latent preview (when the server has previews on), the interrupt check and the step
        listeners, once per step."""
        import latent_preview  # type: ignore[import-not-found]
        from comfy import latent_formats  # type: ignore[import-not-found]
        from comfy_execution.progress import get_progress_state  # type: ignore[import-not-found]

        bar = comfy_utils.ProgressBar(total, node_id=node_id)
        previewer = latent_preview.get_previewer(self.torch_device(), latent_formats.Flux())
        # The terminal's step bar, as ComfyUI's own samplers draw it (tqdm), unless progress bars are turned off.
        terminal = tqdm(total=total, disable=not comfy_utils.PROGRESS_BAR_ENABLED)

        def on_step(step: int, total_: int, x0: torch.Tensor) -> None:
            self.throw_if_interrupted()
            preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
            bar.update_absolute(step, total_, preview)
            terminal.total = total_
            if step < total_:
                terminal.update(step - terminal.n)
            else:  # closing draws the full bar once
                terminal.n = step
                terminal.close()
            if self._step_listeners:
                prompt_id = get_progress_state().prompt_id
                for listener in self._step_listeners:
                    listener(prompt_id, step, total_, x0)

        return on_step

    def add_step_listener(self, listener: StepListener) -> None:
        """`listener(prompt_id, step, total, x0)` after every sampler step of the pack (the fal routes' logs and
        stream previews)."""
        if listener not in self._step_listeners:
            self._step_listeners.append(listener)

    def work_progress(self, total: int, node_id: str | None = None) -> WorkCallback:
        bar = comfy_utils.ProgressBar(total, node_id=node_id)

        def update(done: int, total_: int) -> None:
            self.throw_if_interrupted()
            bar.update_absolute(done, total_)

        return update

    def node_report(self, text: str, fields: dict[str, Any]) -> dict[str, list]:
        """The report goes to the browser that queued the prompt as a `krea.report` message (web/krea.js draws
        the badges); nothing goes into the history, whose every entry the queue panel counts as an output."""
        from comfy_execution.progress import get_progress_state  # type: ignore[import-not-found]
        from comfy_execution.utils import get_executing_context  # type: ignore[import-not-found]

        # The server's module only when ComfyUI's server runs in this process (importing it elsewhere fails).
        server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
        context = get_executing_context()
        if server is not None and context is not None:
            display = get_progress_state().dynprompt.get_display_node_id(context.node_id)
            server.send_sync(REPORT_EVENT, {"node": context.node_id, "display_node": display or context.node_id,
                                            "prompt_id": context.prompt_id, "text": text, "report": fields},
                             server.client_id)
        return {}

    # -- saving --------------------------------------------------------------------------------------------
    def output_directory(self) -> Path:
        return Path(folder_paths.get_output_directory())

    def save_image_path(self, filename_prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
        # folder_paths.get_save_image_path refuses prefixes that leave the output folder.
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, str(self.output_directory()), width, height)
        return Path(folder), filename, counter, subfolder

    def metadata_enabled(self) -> bool:
        from comfy.cli_args import args  # type: ignore[import-not-found]

        return not args.disable_metadata

    # -- the models the loader hands out: ComfyUI's own types, each kept in the loader's slot -----------------
    def transformer_model(self, path: Path, weight_dtype: str, device: torch.device, slot: ModelSlot) -> Any:
        """A standard ModelPatcher, loaded now onto the offload device."""
        return kept(slot, (file_key(path), weight_dtype),
                    lambda: comfyui_models.transformer_model(path, weight_dtype))

    def text_encoder_model(self, clip_path: Path, t5_path: Path, slot: ModelSlot) -> Any:
        return kept(slot, (file_key(clip_path), file_key(t5_path)),
                    lambda: comfyui_models.flux_clip(clip_path, t5_path))

    def vae_model(self, path: Path, slot: ModelSlot) -> Any:
        return kept(slot, (file_key(path),), lambda: comfyui_models.flux_vae(path))

    def prompt_tokenizers(self) -> tuple[FixedLengthTokenizer, FixedLengthTokenizer]:
        """The pack's CLIP and T5 tokenizers over the tokenizer files ComfyUI ships (loaded once)."""
        folders = self.shipped_tokenizer_dirs()
        return cached_load("tokenizers", (str(folders["clip"]), str(folders["t5"])),
                           lambda: (load_clip_tokenizer(folders["clip"]), load_t5_tokenizer(folders["t5"])))

    def encode_prompt(self, text_encoder: Any, prompt: str) -> list:
        return comfyui_models.encode_prompt(text_encoder, prompt, self.prompt_tokenizers())

    def encode_pixels(self, vae: Any, images: torch.Tensor) -> torch.Tensor:
        return comfyui_models.encode_pixels(vae, images)

    def decode_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        return comfyui_models.decode_latents(vae, latents)

    def loaded_transformer(self, model: Any, latent_shape: tuple[int, ...], extra_bytes: int = 0) -> LoadedTransformer:
        return comfyui_models.load_transformer(model, latent_shape, extra_bytes)

    def register_routes(self) -> None:
        from .fal_queue import register_fal_routes

        register_fal_routes(self.add_step_listener)
