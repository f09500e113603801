"""The only package that imports ComfyUI. Everything else asks the host through these functions.

Inside ComfyUI they use folder_paths, comfy.model_management and comfy.utils; outside (tests, the CLI)
they use a models folder with ComfyUI's layout and an output folder, set by `configure_standalone`.
`models.py` hands the transformer to ComfyUI as a standard MODEL.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ...model_loader import FileKind, ModelFileError
from .models import LoadedTransformer

try:  # ComfyUI's modules are importable only when the pack runs inside it.
    import comfy.model_management as model_management  # type: ignore[import-not-found]
    import comfy.utils as comfy_utils  # type: ignore[import-not-found]
    import folder_paths  # type: ignore[import-not-found]

    IN_COMFYUI = True
except ImportError:
    folder_paths = None
    model_management = None
    comfy_utils = None
    IN_COMFYUI = False

MODEL_EXTENSIONS = (".safetensors", ".sft")

# Our folder name -> the sub-folders of a models folder searched for it (ComfyUI's names and aliases).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "safety_checker": ("safety_checker",),
}

# The ComfyUI folder each kind of model file belongs in (model_loader names kinds, never folders).
KIND_FOLDERS: dict[FileKind, str] = {
    FileKind.FLUX_TRANSFORMER: "diffusion_models",
    FileKind.CHROMA: "diffusion_models",
    FileKind.SD_UNET: "diffusion_models",
    FileKind.SD3_MMDIT: "diffusion_models",
    FileKind.OTHER_TRANSFORMER: "diffusion_models",
    FileKind.BUNDLE: "checkpoints",
    FileKind.LORA: "loras",
    FileKind.VAE: "vae",
    FileKind.PREVIEW_VAE: "vae_approx",
    FileKind.CLIP_TEXT: "text_encoders",
    FileKind.T5_TEXT: "text_encoders",
    FileKind.CLIP_VISION: "clip_vision",
    FileKind.VIT_CLASSIFIER: "safety_checker",
}

StepCallback = Callable[[int, int, torch.Tensor], None]
# Inside ComfyUI: told of every sampler step as (prompt id, step, total), e.g. the fal routes' request logs.
_step_listeners: list[Callable[[str, int, int], None]] = []

_standalone: dict = {"progress": None, "tokenizer_dir": None,
               "models_dir": Path(os.environ.get("KREA_MODELS_DIR", "models")),
               "output_dir": Path(os.environ.get("KREA_OUTPUT_DIR", "output"))}

if IN_COMFYUI:
    # Register models/safety_checker, keeping folders that extra_model_paths.yaml may have added already
    # (those come with an empty extension set, which would list config.json files too).
    _paths = folder_paths.folder_names_and_paths.get("safety_checker", ([], set()))[0]
    _default = os.path.join(folder_paths.models_dir, "safety_checker")
    folder_paths.folder_names_and_paths["safety_checker"] = (
        [*_paths, _default] if _default not in _paths else _paths, set(MODEL_EXTENSIONS))


class Interrupted(Exception):
    """Outside ComfyUI: the run was stopped through the `interrupt` event (the fal server's cancel)."""


def configure_standalone(models_dir: str | os.PathLike[str] | None = None,
                         output_dir: str | os.PathLike[str] | None = None,
                         progress: StepCallback | None = None,
                         tokenizer_dir: str | os.PathLike[str] | None = None,
                         interrupt: threading.Event | None = None) -> None:
    """Set the folders (and a per-step progress reporter) used outside ComfyUI (CLI, tests, the fal server);
    setting `interrupt` stops the running workflow before the next transformer block (Interrupted)."""
    if interrupt is not None:
        _standalone["interrupt"] = interrupt
    if tokenizer_dir is not None:
        _standalone["tokenizer_dir"] = Path(tokenizer_dir)
    if models_dir is not None:
        _standalone["models_dir"] = Path(models_dir)
    if output_dir is not None:
        _standalone["output_dir"] = Path(output_dir)
    if progress is not None:
        _standalone["progress"] = progress


def standalone_settings() -> dict:
    """A copy of what `configure_standalone` set, for `restore_standalone` (tests put it back after a run)."""
    return dict(_standalone)


def restore_standalone(settings: dict) -> None:
    """Put back settings taken with `standalone_settings`, dropping any made since."""
    _standalone.clear()
    _standalone.update(settings)


def model_search_paths(folder: str) -> list[Path]:
    if IN_COMFYUI:
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]
    return [_standalone["models_dir"].absolute() / sub for sub in MODEL_FOLDERS[folder]]


def list_models(folder: str) -> list[str]:
    """Model files (relative names, '/'-separated) of one folder; diffusers model folders are listed too."""
    if IN_COMFYUI:
        return list(folder_paths.get_filename_list(folder))
    names: set[str] = set()
    for root in model_search_paths(folder):
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            if path.is_file() and path.suffix in MODEL_EXTENSIONS:
                names.add(path.relative_to(root).as_posix())
    return sorted(names)


def model_name_problem(name: object) -> str | None:
    """Why `name` cannot name a model file (None: it can). Names are relative to a model folder, as in
    ComfyUI's lists: an absolute path or a '..' step would leave the folder, so it is refused before any file
    is touched, and the message says nothing about what lies outside."""
    if not isinstance(name, str) or not name.strip():
        return f"the model name {name!r} is not a file name"
    parts = name.replace("\\", "/").split("/")
    if "\0" in name or name.startswith(("/", "\\")) or (name[:1].isalpha() and name[1:2] == ":") or ".." in parts:
        return (f"the model name {name!r} leaves the model folder: names are relative to it (e.g. "
                "'flux1-krea-dev.safetensors' or 'krea/flux1-krea-dev.safetensors'), without '..' or an absolute "
                "path. Put the file into the model folder (a link to it works too) and pick it by name")
    return None


def model_path(folder: str, name: str) -> Path:
    """The full path of a model file inside the `folder` model folders, or an error listing where it was
    looked for. Names that would leave the folders are refused first (model_name_problem)."""
    problem = model_name_problem(name)
    if problem is not None:
        raise ModelFileError(f"{problem[0].upper()}{problem[1:]}.")
    if IN_COMFYUI:
        found = folder_paths.get_full_path(folder, name)
        if found is not None:
            return Path(found)
    else:
        for root in model_search_paths(folder):
            candidate = root / name
            if candidate.exists():
                return candidate
    searched = ", ".join(str(p) for p in model_search_paths(folder)) or "(no folder configured)"
    raise ModelFileError(
        f"Model file {name!r} not found. Searched the {folder!r} folders: {searched}. "
        f"Put the file in one of them (or pick another file in the node)."
    )


def with_folders(err: ModelFileError) -> ModelFileError:
    """The same error, its message ending with the folders the wrong file and the right one belong in."""
    hints = []
    if err.found is not None and err.found is not err.expected and err.found in KIND_FOLDERS:
        hints.append(f"{err.found.short} files belong in models/{KIND_FOLDERS[err.found]}")
    if err.expected is not None and err.expected in KIND_FOLDERS:
        hints.append(f"{err.expected.short} files in models/{KIND_FOLDERS[err.expected]}")
    if not hints:
        return err
    text = "; ".join(hints)
    return ModelFileError(f"{err} {text[0].upper()}{text[1:]}.", found=err.found, expected=err.expected)


def tokenizer_dir() -> Path | None:
    """The tokenizer folder the user named outside ComfyUI (None: look beside the model files)."""
    return None if IN_COMFYUI else _standalone["tokenizer_dir"]


def output_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_output_directory())
    return _standalone["output_dir"]


def torch_device() -> torch.device:
    """Where the transformer runs: ComfyUI's device inside it, else CUDA when there is one."""
    if IN_COMFYUI:
        return model_management.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_devices(kind: str) -> tuple[torch.device, torch.device]:
    """(where a model of `kind` computes, where its weights wait): ComfyUI's devices for its own models of that
    kind ("text_encoder", "vae", "safety_checker") inside it; outside, the compute device for both."""
    if not IN_COMFYUI:
        device = torch_device()
        return device, device
    return {
        "text_encoder": (model_management.text_encoder_device(), model_management.text_encoder_offload_device()),
        "vae": (model_management.vae_device(), model_management.vae_offload_device()),
        "safety_checker": (model_management.get_torch_device(), model_management.unet_offload_device()),
    }[kind]


def intermediate_device() -> torch.device:
    """Where IMAGE and LATENT outputs live between nodes."""
    if IN_COMFYUI:
        return model_management.intermediate_device()
    return torch.device("cpu")


def throw_if_interrupted() -> None:
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()
        return
    event = _standalone.get("interrupt")
    if event is not None and event.is_set():
        event.clear()
        raise Interrupted("the run was cancelled")


def block_interrupt_check() -> Callable[[], None] | None:
    """What the sampler calls between transformer blocks to stop on Cancel: ComfyUI's interrupt check inside
    it, or the `interrupt` event's outside; None when neither is there (Ctrl-C raises KeyboardInterrupt between
    any two operations anyway)."""
    if IN_COMFYUI:
        return model_management.throw_exception_if_processing_interrupted
    return throw_if_interrupted if _standalone.get("interrupt") is not None else None


def progress_callback(total: int, node_id: str | None = None) -> StepCallback:
    """callback(step, total, x0): progress bar, latent preview (when the server has previews on) and the
    interrupt check, once per step. x0 is the model-space (B, 16, H/8, W/8) prediction of the clean latent."""
    if not IN_COMFYUI:
        reporter = _standalone.get("progress")

        def report(step: int, total_: int, x0: torch.Tensor) -> None:
            throw_if_interrupted()
            if reporter is not None:
                reporter(step, total_, x0)

        return report
    import latent_preview  # type: ignore[import-not-found]
    from comfy import latent_formats  # type: ignore[import-not-found]
    from comfy_execution.progress import get_progress_state  # type: ignore[import-not-found]

    bar = comfy_utils.ProgressBar(total, node_id=node_id)
    previewer = latent_preview.get_previewer(torch_device(), latent_formats.Flux())

    def on_step(step: int, total_: int, x0: torch.Tensor) -> None:
        throw_if_interrupted()
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
        bar.update_absolute(step, total_, preview)
        if _step_listeners:
            prompt_id = get_progress_state().prompt_id
            for listener in _step_listeners:
                listener(prompt_id, step, total_)

    return on_step


def add_step_listener(listener: Callable[[str, int, int], None]) -> None:
    """Inside ComfyUI: `listener(prompt_id, step, total)` after every sampler step of the pack."""
    if listener not in _step_listeners:
        _step_listeners.append(listener)


def work_progress(total: int, node_id: str | None = None) -> Callable[[int, int], None]:
    """update(done, total) for work without latents (VAE tiles): a progress bar and the interrupt check."""
    if not IN_COMFYUI:
        return lambda done, total_: throw_if_interrupted()
    bar = comfy_utils.ProgressBar(total, node_id=node_id)

    def update(done: int, total_: int) -> None:
        throw_if_interrupted()
        bar.update_absolute(done, total_)

    return update


def metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata (no prompt or workflow in saved images)."""
    if not IN_COMFYUI:
        return True
    from comfy.cli_args import args  # type: ignore[import-not-found]

    return not args.disable_metadata


def comfyui_tokenizer_dirs() -> dict[str, Path] | None:
    """The CLIP and T5 tokenizer folders that ComfyUI ships, when the pack runs inside it."""
    if not IN_COMFYUI:
        return None
    comfy_dir = Path(comfy_utils.__file__).resolve().parent
    return {"clip": comfy_dir / "sd1_tokenizer", "t5": comfy_dir / "text_encoders" / "t5_tokenizer"}


def save_image_path(filename_prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, filename base, first free counter, subfolder) for saving images, with ComfyUI's naming.

    Inside ComfyUI this is folder_paths.get_save_image_path (it refuses prefixes that leave the output
    folder). Outside, the same `<prefix>_<counter:05>_` scheme in the standalone output folder.
    """
    if IN_COMFYUI:
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, str(output_directory()), width, height)
        return Path(folder), filename, counter, subfolder
    root = output_directory().resolve()
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


def save_folder_problem(filename_prefix: str) -> str | None:
    """Why images saved with `filename_prefix` could not be written (None: they can), found before any work:
    a prefix that leaves the output folder, or a folder that cannot be created or written to. Creates nothing:
    the deepest existing folder on the way must be a folder, and one empty temporary file is written and
    removed there to know it is writable (permission bits do not tell, e.g. for root or read-only mounts)."""
    try:
        folder = save_image_path(filename_prefix, 16, 16)[0]
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
        return (f"images cannot be written to {folder}: {err.strerror or err}. Make the output folder a "
                "writable folder, or choose another one (--output) or another filename_prefix.")
    return None


def transformer_model(path: Path, weight_dtype: str, device: torch.device):
    """What KreaModelLoader outputs as MODEL: inside ComfyUI a standard ModelPatcher (loaded now, onto the
    offload device; ComfyUI's cache owns it); outside, a handle that loads on first use."""
    if IN_COMFYUI:
        from .models import transformer_model as comfy_transformer_model

        return comfy_transformer_model(path, weight_dtype)
    from ..handles import TransformerHandle

    return TransformerHandle(path, weight_dtype, device)


def loaded_transformer(model, latent_shape: tuple[int, ...], extra_bytes: int = 0) -> LoadedTransformer:
    """The transformer of a MODEL input, loaded for sampling `latent_shape` (B, 16, H/8, W/8); `extra_bytes`:
    what the sampler holds beside ComfyUI's own estimate (the step cache's residuals)."""
    if IN_COMFYUI:
        from .models import load_transformer

        return load_transformer(model, latent_shape, extra_bytes)
    module = model.load()
    return LoadedTransformer(module=module, device=model.device, compute_dtype=module.compute_dtype,
                             is_pack_model=True, streamed=False)
