"""Stand-ins of the ComfyUI 0.3.64 modules the host adapter (nodes/host/comfyui_models.py, comfyui_host.py) imports,
so the adapter runs in-process in the plain suite (tests/test_comfyui_adapter.py, test_comfyui_host_calls.py,
test_comfyui_gguf_lora_resident.py, test_comfyui_text_encoders_and_vae.py). Each keeps the real one's shape
and records what the adapter asked of it:

- folder_paths: `folder_names_and_paths` (name -> (folder list, extension set; an empty set lists every file)),
  get_filename_list (the files under a name's folders with its extensions, relative, sorted; KeyError for a name
  never registered), get_full_path (the first folder holding the file, whatever its extension; None for an unknown
  name), get_folder_paths (a copy of the list), get_output_directory, get_save_image_path (a prefix's %width% and
  %height%, its sub-folder, refusal outside the output folder, the next free counter).
- comfy.model_management: devices, unet_dtype, load_models_gpu(models, memory_required), the interrupt check.
- comfy.model_patcher: ModelPatcher(model, load_device, offload_device) with `patches` (key -> [(strength,
  adapter, strength_model, offset (dim, start, length) or None, function)]) and callbacks by type and key;
  LowVramPatch(key, patches, convert_func=None, set_func=None).
- comfy.model_base.BaseModel / Flux (torch modules holding `diffusion_model`), comfy.supported_models.Flux,
  comfy.ops, comfy.weight_adapter.LoRAAdapter(loaded_keys, weights), comfy.patcher_extension.CallbacksMP.
- comfy.sd: CLIP (cond_stage_model, tokenizer_options), load_text_encoder_state_dicts, CLIPType, VAE (latent
  channels, latent_dim, upscale_ratio read off a FLUX autoencoder's tensors); comfy.text_encoders.flux.FluxClipModel.
- comfy.utils.ProgressBar, PROGRESS_BAR_ENABLED, __file__ (ComfyUI/comfy/utils.py); latent_preview.get_previewer
  (None when previews are off, else a previewer whose decode_latent_to_preview_image gives ("JPEG", image, 512));
  comfy_execution.progress.get_progress_state (prompt_id, dynprompt.get_display_node_id),
  comfy_execution.utils.get_executing_context (an ExecutionContext or None), comfy.cli_args.args, and server
  (PromptServer.instance with client_id and send_sync(event, data, sid)) once a test starts one.

What the real ComfyUI then does (its LoRA key map, memory estimate, encoders, partial loading) is checked against the
real thing in tests/test_comfyui_host*.py.
"""
from __future__ import annotations

import enum
import importlib
import json
import math
import os
import struct
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from comfyui_krea.model_loader.operations import CastOps
from comfyui_krea.nodes.host import holding

CPU = torch.device("cpu")
PT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # ComfyUI's model files


class ExecutionContext(NamedTuple):  # comfy_execution.utils.ExecutionContext
    prompt_id: str
    node_id: str
    list_index: int | None


@dataclass
class Calls:
    """What the adapter asked of the stand-ins, and the answers they give."""
    load_models_gpu: list = field(default_factory=list)
    pick_operations: list = field(default_factory=list)
    scaled_fp8_ops: list = field(default_factory=list)
    unet_dtype: list = field(default_factory=list)
    unet_dtype_answer: torch.dtype = torch.float32  # ComfyUI's choice on a CPU
    interrupted: bool = False
    events: list = field(default_factory=list)
    previews: bool = False  # whether get_previewer gives a previewer (the server's --preview-method)
    previewer_asked: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)  # load_text_encoder_state_dicts' arguments
    encoded: list = field(default_factory=list)  # the tokens CLIP.encode_from_tokens_scheduled was given
    vae_calls: list = field(default_factory=list)
    context: ExecutionContext | None = None
    display: dict = field(default_factory=dict)  # the dynamic prompt's ephemeral node -> display node
    sent: list = field(default_factory=list)  # PromptServer.send_sync(event, data, sid)


def write_zero_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A bf16 safetensors file of zeros in those names and shapes, written sparse (full-size files cost no time)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def _module(name: str, **attributes) -> types.ModuleType:
    made = types.ModuleType(name)
    made.__dict__.update(attributes)
    return made


def _folder_paths(root: Path) -> types.ModuleType:
    models = root / "models"
    known = {"safety_checker": (["/extra/safety"], set()),  # as extra_model_paths.yaml leaves it
             **{name: ([str(models / sub)], set(PT_EXTENSIONS)) for name, sub in (
                 ("diffusion_models", "diffusion_models"), ("text_encoders", "text_encoders"), ("vae", "vae"),
                 ("loras", "loras"), ("embeddings", "embeddings"))}}

    def get_filename_list(folder_name: str) -> list[str]:
        paths, extensions = known[folder_name]
        found = set()
        for folder in paths:
            for dirpath, _, filenames in os.walk(folder):
                found |= {os.path.relpath(os.path.join(dirpath, name), folder) for name in filenames
                          if not extensions or os.path.splitext(name)[1].lower() in extensions}
        return sorted(found)

    def get_full_path(folder_name: str, filename: str) -> str | None:
        if folder_name not in known:
            return None
        for folder in known[folder_name][0]:
            if os.path.isfile(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
        return None

    def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0):
        prefix = filename_prefix.replace("%width%", str(image_width)).replace("%height%", str(image_height))
        subfolder, filename = os.path.dirname(os.path.normpath(prefix)), os.path.basename(os.path.normpath(prefix))
        full = os.path.join(output_dir, subfolder)
        if os.path.commonpath((output_dir, os.path.abspath(full))) != output_dir:
            raise Exception("Saving image outside the output folder is not allowed.")
        os.makedirs(full, exist_ok=True)
        taken = [int(name[len(filename) + 1:].split("_")[0]) for name in os.listdir(full)
                 if name.startswith(filename + "_") and name[len(filename) + 1:].split("_")[0].isdigit()]
        return full, filename, max(taken, default=0) + 1, subfolder, prefix

    return _module("folder_paths", models_dir=str(models), folder_names_and_paths=known,
                   get_filename_list=get_filename_list, get_full_path=get_full_path,
                   get_folder_paths=lambda name: known[name][0][:],
                   get_output_directory=lambda: str(root / "output"), get_save_image_path=get_save_image_path)


def stand_ins(calls: Calls, root: Path) -> dict[str, types.ModuleType]:
    """comfy.* and the other modules holding the functions the adapter calls, over a ComfyUI folder `root`."""

    class SupportedFlux:  # comfy.supported_models.Flux: the config a MODEL carries (unet_config)
        def __init__(self, unet_config: dict) -> None:
            self.unet_config = dict(unet_config)
            self.inference = None

        def set_inference_dtype(self, dtype: torch.dtype, manual_cast: torch.dtype | None) -> None:
            self.inference = (dtype, manual_cast)

    class BaseModel(torch.nn.Module):
        def __init__(self, model_config, device=None) -> None:
            super().__init__()
            self.model_config, self.device = model_config, device
            self.manual_cast_dtype = model_config.inference[1] if model_config.inference else None
            self.asked: list[tuple] = []

        def memory_required(self, shape) -> float:  # a stand-in figure; the real estimate is ComfyUI's
            self.asked.append(tuple(shape))
            return 1000.5 * math.prod(shape)

        def get_dtype(self) -> torch.dtype:
            return self.diffusion_model.dtype

    class Flux(BaseModel):
        pass

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False) -> None:
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            self.patches: dict[str, list] = {}
            self.callbacks: dict[str, dict[str, list]] = {}

        def add_callback_with_key(self, call_type: str, key: str, callback) -> None:
            self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

        def get_all_callbacks(self, call_type: str) -> list:
            return [c for by_key in self.callbacks.get(call_type, {}).values() for c in by_key]

    class LowVramPatch:
        def __init__(self, key, patches, convert_func=None, set_func=None) -> None:
            self.key, self.patches, self.convert_func, self.set_func = key, patches, convert_func, set_func

    class LoRAAdapter:  # comfy.weight_adapter.LoRAAdapter: weights (up, down, alpha, mid, dora_scale, reshape)
        name = "lora"

        def __init__(self, loaded_keys, weights) -> None:
            self.loaded_keys, self.weights = loaded_keys, weights

    class LoHaAdapter:  # weights (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale)
        name = "loha"

        def __init__(self, loaded_keys, weights) -> None:
            self.loaded_keys, self.weights = loaded_keys, weights

    def pick_operations(weight_dtype, compute_dtype, load_device=None, fp8_optimizations=False):
        calls.pick_operations.append((weight_dtype, compute_dtype, load_device, fp8_optimizations))
        return CastOps

    def scaled_fp8_ops(fp8_matrix_mult=False, scale_input=False):
        calls.scaled_fp8_ops.append((fp8_matrix_mult, scale_input))
        return CastOps

    def unet_dtype(device=None, model_params=0, supported_dtypes=(), weight_dtype=None):
        calls.unet_dtype.append((device, list(supported_dtypes), weight_dtype))
        return calls.unet_dtype_answer

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        calls.load_models_gpu.append((list(models), memory_required))

    def throw_if_interrupted():
        calls.events.append("interrupt check")
        if calls.interrupted:
            raise InterruptedError

    class ProgressBar:
        def __init__(self, total, node_id=None) -> None:
            calls.events.append(("bar", total, node_id))

        def update_absolute(self, value, total=None, preview=None) -> None:
            calls.events.append(("update", value, total, preview))

    class LatentFormatFlux:  # comfy.latent_formats.Flux
        latent_channels = 16

    class Previewer:
        def decode_latent_to_preview_image(self, preview_format, x0):
            return ("JPEG", ("preview of", x0), 512)  # ComfyUI's previewers give JPEG whatever is asked

    def get_previewer(device, latent_format):
        calls.previewer_asked.append((device, latent_format))
        return Previewer() if calls.previews else None

    class CLIPType(enum.Enum):
        STABLE_DIFFUSION = 1
        FLUX = 6

    class FluxClipModel:
        pass

    class SD1ClipModel:
        pass

    class CLIP:
        def __init__(self, cond_stage_model=None) -> None:
            self.cond_stage_model = cond_stage_model
            self.tokenizer_options: dict = {}

        def set_tokenizer_option(self, option_name, value) -> None:
            self.tokenizer_options[option_name] = value

        def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict=None, show_pbar=True):
            calls.encoded.append(tokens)
            return [[torch.zeros(1, len(tokens["t5xxl"][0]), 4), {"pooled_output": torch.zeros(1, 4)}]]

    def load_text_encoder_state_dicts(state_dicts=(), embedding_directory=None,
                                      clip_type=CLIPType.STABLE_DIFFUSION, model_options=None):
        calls.text_encoders.append({"state_dicts": state_dicts, "embedding_directory": embedding_directory,
                                    "clip_type": clip_type, "model_options": model_options})
        return CLIP(FluxClipModel() if clip_type == CLIPType.FLUX else SD1ClipModel())

    class VAE:
        def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None) -> None:
            conv_in = sd["decoder.conv_in.weight"]  # FLUX's autoencoder: 16 latent channels, 8x, 2-D
            self.latent_channels, self.latent_dim, self.upscale_ratio = conv_in.shape[1], 2, 8
            self.first_stage_model = sd

        @classmethod
        def of(cls, latent_channels: int, latent_dim: int, upscale_ratio: int):
            vae = cls.__new__(cls)
            vae.latent_channels, vae.latent_dim, vae.upscale_ratio = latent_channels, latent_dim, upscale_ratio
            vae.first_stage_model = object()
            return vae

        def spacial_compression_decode(self) -> int:
            return self.upscale_ratio

        def throw_exception_if_invalid(self) -> None:
            if self.first_stage_model is None:
                raise RuntimeError("invalid VAE")

        def encode(self, pixel_samples):
            calls.vae_calls.append(("encode", pixel_samples))
            b, h, w, _ = pixel_samples.shape
            return torch.full((b, self.latent_channels, h // 8, w // 8), 0.5)

        def decode(self, samples_in, vae_options=None):
            calls.vae_calls.append(("decode", samples_in))
            b, _, h, w = samples_in.shape  # float32 on the intermediate device, channels moved last
            return torch.full((b, 3, h * 8, w * 8), 0.25).movedim(1, -1)

    class DynamicPrompt:
        def get_display_node_id(self, node_id):
            while node_id in calls.display:
                node_id = calls.display[node_id]
            return node_id

    registry = types.SimpleNamespace(prompt_id="p1", dynprompt=DynamicPrompt())
    made = {
        "comfy": _module("comfy"),
        "comfy.model_base": _module("comfy.model_base", BaseModel=BaseModel, Flux=Flux),
        "comfy.model_management": _module(
            "comfy.model_management", get_torch_device=lambda: CPU, unet_offload_device=lambda: CPU,
            supports_fp8_compute=lambda device: False, unet_dtype=unet_dtype, load_models_gpu=load_models_gpu,
            throw_exception_if_processing_interrupted=throw_if_interrupted, intermediate_device=lambda: CPU,
            text_encoder_device=lambda: torch.device("meta"), text_encoder_offload_device=lambda: CPU,
            vae_device=lambda: torch.device("meta"), vae_offload_device=lambda: CPU),
        "comfy.model_patcher": _module("comfy.model_patcher", ModelPatcher=ModelPatcher, LowVramPatch=LowVramPatch),
        "comfy.ops": _module("comfy.ops", pick_operations=pick_operations, scaled_fp8_ops=scaled_fp8_ops),
        "comfy.weight_adapter": _module("comfy.weight_adapter", LoRAAdapter=LoRAAdapter, LoHaAdapter=LoHaAdapter),
        "comfy.patcher_extension": _module("comfy.patcher_extension", CallbacksMP=types.SimpleNamespace(
            ON_LOAD="on_load", ON_DETACH="on_detach")),
        "comfy.sd": _module("comfy.sd", CLIP=CLIP, VAE=VAE, CLIPType=CLIPType,
                            load_text_encoder_state_dicts=load_text_encoder_state_dicts),
        "comfy.text_encoders": _module("comfy.text_encoders"),
        "comfy.text_encoders.flux": _module("comfy.text_encoders.flux", FluxClipModel=FluxClipModel),
        "comfy.supported_models": _module("comfy.supported_models", Flux=SupportedFlux),
        "comfy.utils": _module("comfy.utils", ProgressBar=ProgressBar, PROGRESS_BAR_ENABLED=False,
                               __file__=str(root / "comfy" / "utils.py")),
        "comfy.latent_formats": _module("comfy.latent_formats", Flux=LatentFormatFlux),
        "comfy.cli_args": _module("comfy.cli_args", args=types.SimpleNamespace(disable_metadata=False)),
        "latent_preview": _module("latent_preview", get_previewer=get_previewer),
        "comfy_execution": _module("comfy_execution"),
        "comfy_execution.progress": _module("comfy_execution.progress", get_progress_state=lambda: registry),
        "comfy_execution.utils": _module("comfy_execution.utils", ExecutionContext=ExecutionContext,
                                         get_executing_context=lambda: calls.context),
        "folder_paths": _folder_paths(root),
    }
    for name, submodule in made.items():  # `import comfy.ops` binds comfy, then reads comfy.ops
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(made[parent], leaf, submodule)
    return made


def start_server(monkeypatch, calls: Calls, client_id: str | None = "browser-1"):
    """ComfyUI's server module once main.py made its PromptServer (node_report looks for it in sys.modules)."""
    class PromptServer:
        instance = None

        def __init__(self) -> None:
            PromptServer.instance = self
            self.client_id = client_id

        def send_sync(self, event, data, sid=None) -> None:
            calls.sent.append((event, data, sid))

    monkeypatch.setitem(sys.modules, "server", _module("server", PromptServer=PromptServer))
    return PromptServer()


ADAPTER = ("comfyui_krea.nodes.host.comfyui_models", "comfyui_krea.nodes.host.comfyui_host")


def adapter_over_stand_ins(monkeypatch, root: Path) -> Iterator[types.SimpleNamespace]:
    """The adapter's modules imported over the stand-ins (a fixture's body); both are dropped again afterwards, so
    the rest of the session never sees them (the pack runs outside ComfyUI there), and the model cache is emptied."""
    calls = Calls()
    for name, made in stand_ins(calls, root).items():
        monkeypatch.setitem(sys.modules, name, made)
    monkeypatch.delitem(sys.modules, "server", raising=False)
    for name in ADAPTER:
        monkeypatch.delitem(sys.modules, name, raising=False)
    holding.forget_loaded()
    models = importlib.import_module(ADAPTER[0])
    host = importlib.import_module(ADAPTER[1])
    yield types.SimpleNamespace(calls=calls, models=models, host=host, stand_ins=sys.modules, root=root)
    holding.forget_loaded()
    package = sys.modules["comfyui_krea.nodes.host"]
    for name in ADAPTER:
        sys.modules.pop(name, None)
        if hasattr(package, name.rpartition(".")[2]):
            delattr(package, name.rpartition(".")[2])
