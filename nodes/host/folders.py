"""Model folders and model names, the same for both hosts: which folder each kind of file belongs in, and which
names may name a model file at all.

The engine (model_loader) names kinds of files, never folders; these tables turn a kind into ComfyUI's folder
name for messages, and `model_name_problem` refuses a name that would leave the model folders before any file
is touched.
"""
from __future__ import annotations

from pathlib import Path

from ...model_loader import FileKind, ModelFileError

MODEL_EXTENSIONS = (".safetensors", ".sft")
GGUF_EXTENSIONS = (".gguf",)
# Folders whose models may also be GGUF files (quantized transformers, encoder-only T5 files).
GGUF_FOLDERS = ("diffusion_models", "text_encoders")

# Our folder name -> the sub-folders of a models folder searched for it (ComfyUI's names and aliases).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "safety_checker": ("safety_checker",),
    "loras": ("loras",),
}

# Where a ComfyUI folder keeps the tokenizer files ComfyUI ships (CLIP's vocab.json + merges.txt, T5's
# tokenizer.json): inside ComfyUI, and for the command line when the pack sits in ComfyUI's custom_nodes.
COMFYUI_TOKENIZERS: dict[str, tuple[str, ...]] = {"clip": ("comfy", "sd1_tokenizer"),
                                                  "t5": ("comfy", "text_encoders", "t5_tokenizer")}


def comfyui_tokenizer_dirs(comfyui_dir: Path) -> dict[str, Path]:
    """{"clip": folder, "t5": folder} of the tokenizers the ComfyUI at `comfyui_dir` ships."""
    return {kind: comfyui_dir.joinpath(*parts) for kind, parts in COMFYUI_TOKENIZERS.items()}


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


def model_extensions(folder: str) -> tuple[str, ...]:
    """The file endings listed as models of `folder`."""
    return MODEL_EXTENSIONS + GGUF_EXTENSIONS if folder in GGUF_FOLDERS else MODEL_EXTENSIONS


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


def with_folders(err: ModelFileError) -> ModelFileError:
    """The same error, its message ending with the folders the wrong file and the right one belong in (said once
    when they are the same folder, as for the two text encoders)."""
    found = KIND_FOLDERS.get(err.found) if err.found is not None and err.found is not err.expected else None
    expected = KIND_FOLDERS.get(err.expected) if err.expected is not None else None
    if found is not None and found == expected:
        hints = [f"{err.found.short} and {err.expected.short} files both belong in models/{found}"]
    else:
        hints = [f"{err.found.short} files belong in models/{found}"] if found is not None else []
        if expected is not None:
            hints.append(f"{err.expected.short} files in models/{expected}")
    if not hints:
        return err
    text = "; ".join(hints)
    return ModelFileError(f"{err} {text[0].upper()}{text[1:]}.", found=err.found, expected=err.expected)
