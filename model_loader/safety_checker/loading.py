"""NSFW classifier files -> a ready `SafetyChecker` on a device (float32, memory-mapped where it can be)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..checkpoints import FileKind, identify, open_checkpoint
from ..compute_dtypes import CLASSIFIER_DTYPE
from ..errors import ModelFileError
from .layouts import WHERE_TO_GET_IT, config_from_checkpoint, in_file_layout
from .model import SafetyChecker, ViTImageClassifier

log = logging.getLogger(__name__)

# Keys a ViTForImageClassification file may hold that this classifier does not use.
_IGNORED_PREFIXES = ("vit.pooler.",)


def load_safety_checker(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> SafetyChecker:
    """Load an NSFW classifier file (or HF model folder) onto `device`; weights are computed in float32.

    The module is built on the meta device and its parameters are the memory-mapped tensors of the file
    (float32 files on the CPU hold no second copy); other dtypes or devices are converted tensor by tensor.
    """
    path = Path(path)
    device = torch.device(device)
    checkpoint = in_file_layout(open_checkpoint(path))
    config = config_from_checkpoint(checkpoint)
    with torch.device("meta"):
        model = ViTImageClassifier(config)
    expected = set(model.state_dict())
    present = {k for k in checkpoint.keys() if not k.startswith(_IGNORED_PREFIXES)}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        kind = identify(checkpoint.keys())
        looks = f" It looks like {kind.description}." if kind is not FileKind.VIT_CLASSIFIER else ""
        raise ModelFileError(
            f"{path} is not a complete ViT image classifier: missing {missing[:5]}{'...' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}.{looks} "
            f"Use {WHERE_TO_GET_IT}.", found=kind, expected=FileKind.VIT_CLASSIFIER)
    expected_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(expected):
        if checkpoint.shape(key) != expected_shapes[key]:
            raise ModelFileError(
                f"{path}: tensor {key!r} has shape {checkpoint.shape(key)}, expected {expected_shapes[key]}: "
                f"the file is damaged or of another model.")
        if not checkpoint.dtype(key).is_floating_point:
            raise ModelFileError(f"{path}: tensor {key!r} is {checkpoint.dtype(key)}, not a floating-point weight.")
    state = {k: checkpoint.tensor(k).to(device=device, dtype=CLASSIFIER_DTYPE) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    log.info("Loaded the NSFW classifier %s (%d layers, hidden %d, %d heads, labels %s) on %s.",
             path, config.num_layers, config.hidden_size, config.num_heads, list(config.labels), device)
    return SafetyChecker(model, device, path)
