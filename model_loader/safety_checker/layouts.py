"""NSFW classifier files -> their config: tensor shapes plus the HF config.json beside the file, and what a
file that is not a ViT image classifier holds instead."""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from ..checkpoints import Checkpoint, FileKind, RenamedSource, TensorSource, identify
from ..errors import ModelFileError
from .model import (
    _GELU_APPROXIMATION,
    DEFAULT_HEAD_DIM,
    DEFAULT_LABELS,
    DEFAULT_LAYER_NORM_EPS,
    NSFW_LABEL,
    SafetyCheckerConfig,
)

log = logging.getLogger(__name__)

WHERE_TO_GET_IT = ("the model.safetensors of Falconsai/nsfw_image_detection, saved as "
                   "nsfw_image_detection.safetensors (the name the shipped workflows use; its config.json "
                   "beside it is optional)")
_LAYER_KEY = re.compile(r"^vit\.encoder\.layer\.(\d+)\.")


def _not_a_classifier(path: Path, keys: list[str]) -> ModelFileError:
    kind = identify(keys)
    if kind is FileKind.SD_SAFETY_CHECKER:
        looks = f"It looks like {kind.description}, which this pack does not run."
    elif kind in (FileKind.UNKNOWN, FileKind.VIT_CLASSIFIER):
        looks = f"Its {len(keys)} tensors ({', '.join(repr(k) for k in sorted(keys)[:3])}, ...) are not a ViT's."
    else:
        looks = f"It looks like {kind.description}."
    return ModelFileError(f"{path} is not an NSFW image classifier (ViTForImageClassification). {looks} "
                          f"Use {WHERE_TO_GET_IT}.", found=kind, expected=FileKind.VIT_CLASSIFIER)


def _config_json_path(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / "config.json"


def _read_config_json(path: Path, hidden_size: int, num_layers: int) -> dict:
    """The HF config.json beside the file (or in its folder), when it describes this checkpoint."""
    config_path = _config_json_path(path)
    if not config_path.is_file():
        return {}
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("Ignoring %s: it is not readable JSON (%s).", config_path, error)
        return {}
    if not isinstance(data, dict):
        log.warning("Ignoring %s: it is not a model config.", config_path)
        return {}
    # A config.json of another model in the same folder must not change this one.
    if data.get("hidden_size", hidden_size) != hidden_size or data.get("num_hidden_layers", num_layers) != num_layers:
        log.warning("Ignoring %s: it describes another model (hidden_size %s, %s layers; the file has %s, %s).",
                    config_path, data.get("hidden_size"), data.get("num_hidden_layers"), hidden_size, num_layers)
        return {}
    return data


def _labels_from(id2label: object, num_labels: int, path: Path) -> tuple[str, ...]:
    if not isinstance(id2label, dict):
        raise ModelFileError(f"{path}: config.json has an id2label that is not a mapping ({id2label!r}).")
    try:
        by_index = {int(i): str(label) for i, label in id2label.items()}
    except ValueError:
        raise ModelFileError(f"{path}: config.json id2label has keys that are not label indices.") from None
    if sorted(by_index) != list(range(num_labels)):
        raise ModelFileError(
            f"{path}: config.json names labels {sorted(by_index)} but the classifier has {num_labels} outputs.")
    return tuple(by_index[i] for i in range(num_labels))


# transformers 5.2x's ViTForImageClassification.state_dict() names -> the names of the files users have (what
# save_pretrained still writes, and the module's attribute names here).
_NEW_LAYER_KEY = re.compile(r"^vit\.layers\.(\d+)\.(.+)$")
_NEW_TO_FILE = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
                "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
                "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}


def in_file_layout(checkpoint: TensorSource) -> TensorSource:
    """The checkpoint under the file names (`vit.encoder.layer.N.attention.attention.query`...), also when it
    holds a state dict saved from transformers 5.2x's renamed modules (`vit.layers.N.attention.q_proj`...)."""
    names = {}
    for key in checkpoint.keys():
        m = _NEW_LAYER_KEY.match(key)
        if m is None:
            names[key] = key
            continue
        module, _, leaf = m[2].rpartition(".")
        names[f"vit.encoder.layer.{m[1]}.{_NEW_TO_FILE.get(module, module)}.{leaf}"] = key
    return checkpoint if all(k == v for k, v in names.items()) else RenamedSource(checkpoint, names)


def config_from_checkpoint(checkpoint: Checkpoint) -> SafetyCheckerConfig:
    """The classifier's config, read off the tensor shapes and the config.json beside the file."""
    path = checkpoint.path
    keys = checkpoint.keys()
    required = ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
                "vit.embeddings.patch_embeddings.projection.weight", "classifier.weight")
    if not all(k in checkpoint for k in required):
        raise _not_a_classifier(path, keys)

    hidden_size = checkpoint.shape("vit.embeddings.cls_token")[-1]
    _, num_channels, patch_h, patch_w = checkpoint.shape("vit.embeddings.patch_embeddings.projection.weight")
    num_positions = checkpoint.shape("vit.embeddings.position_embeddings")[1]
    grid = math.isqrt(num_positions - 1)
    if patch_h != patch_w or grid * grid != num_positions - 1:
        raise ModelFileError(
            f"{path}: a ViT with {patch_h}x{patch_w} patches and {num_positions - 1} position embeddings is not "
            f"a square-image classifier like Falconsai/nsfw_image_detection; this node cannot run it.")
    layer_ids = sorted({int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))})
    if not layer_ids or layer_ids != list(range(len(layer_ids))):
        raise ModelFileError(f"{path}: the ViT encoder layers are missing or not numbered 0..N-1 ({layer_ids[:8]}).")
    num_layers = len(layer_ids)
    intermediate_size = checkpoint.shape("vit.encoder.layer.0.intermediate.dense.weight")[0] \
        if "vit.encoder.layer.0.intermediate.dense.weight" in checkpoint else 4 * hidden_size
    num_labels = checkpoint.shape("classifier.weight")[0]

    hf = _read_config_json(path, hidden_size, num_layers)
    try:
        num_heads = int(hf.get("num_attention_heads", 0)) or max(1, hidden_size // DEFAULT_HEAD_DIM)
        layer_norm_eps = float(hf.get("layer_norm_eps", DEFAULT_LAYER_NORM_EPS))
    except (TypeError, ValueError):
        raise ModelFileError(f"{_config_json_path(path)}: num_attention_heads or layer_norm_eps is not a number; "
                             f"fix or remove that config.json.") from None
    if num_heads < 1 or hidden_size % num_heads:
        raise ModelFileError(
            f"{path}: hidden size {hidden_size} does not split into {num_heads} attention heads; put the model's "
            f"config.json (with num_attention_heads) beside the file.")
    if "id2label" in hf:
        labels = _labels_from(hf["id2label"], num_labels, path)
    elif num_labels == len(DEFAULT_LABELS):
        labels = DEFAULT_LABELS
    else:
        raise ModelFileError(
            f"{path}: the classifier has {num_labels} labels and no config.json names them; this node needs a "
            f"two-label normal/nsfw classifier such as Falconsai/nsfw_image_detection.")
    if NSFW_LABEL not in (label.lower() for label in labels):
        raise ModelFileError(
            f"{path} classifies images into {list(labels)[:10]}, with no {NSFW_LABEL!r} label: it is another image "
            f"classifier. Use {WHERE_TO_GET_IT}.",
            found=FileKind.VIT_CLASSIFIER, expected=FileKind.VIT_CLASSIFIER)
    hidden_act = str(hf.get("hidden_act", "gelu"))
    if hidden_act not in _GELU_APPROXIMATION:
        raise ModelFileError(f"{path}: config.json asks for activation {hidden_act!r}; only GELU ViTs are supported.")
    return SafetyCheckerConfig(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        patch_size=patch_h,
        image_size=grid * patch_h,
        num_channels=num_channels,
        labels=labels,
        layer_norm_eps=layer_norm_eps,
        qkv_bias="vit.encoder.layer.0.attention.attention.query.bias" in checkpoint,
        hidden_act=hidden_act,
    )
