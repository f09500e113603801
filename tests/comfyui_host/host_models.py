"""The small models the host scenarios and the fal servers' host tests run on, written without importing ComfyUI
(so a test process can write them and stay outside ComfyUI: scenarios.py imports ComfyUI at its top)."""
from __future__ import annotations

from pathlib import Path

import torch

from comfyui_krea.model_loader.flux import FluxConfig

# vec_in_dim 768: CLIP-L's pooled vector (ComfyUI builds CLIP-L at its one size).
TINY = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=48, hidden_size=64,
                  num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14))


def write_other_models(models: Path, config: FluxConfig, t5_name: str = "t5.safetensors") -> None:
    """Random-weight models under the file names the workflows use, stored as the released files are: CLIP-L at
    its real size (ComfyUI builds it at that one size; fp16, 246 MB), a one-block T5 with the real vocabulary and
    `config`'s width (fp16; ComfyUI's and the pack's tokenizers read the real files), FLUX's autoencoder at its
    real size (ComfyUI's VAE has that one shape; bf16, 168 MB) and the demo classifier."""
    from comfyui_krea.model_loader.autoencoder import FLUX_AUTOENCODER, write_random_autoencoder_checkpoint
    from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
    from comfyui_krea.model_loader.text_encoders import (
        CLIP_L,
        T5EncoderConfig,
        write_random_clip_checkpoint,
        write_random_t5_checkpoint,
    )

    assert config.vec_in_dim == CLIP_L.width
    write_random_clip_checkpoint(models / "text_encoders" / "clip_l.safetensors", CLIP_L, dtype=torch.float16)
    write_random_t5_checkpoint(models / "text_encoders" / t5_name, T5EncoderConfig(
        vocab_size=32128, d_model=config.context_in_dim, d_kv=16, heads=2, d_ff=64, layers=1), dtype=torch.float16)
    write_random_autoencoder_checkpoint(models / "vae" / "ae.safetensors", FLUX_AUTOENCODER, dtype=torch.bfloat16)
    (models / "safety_checker").mkdir(parents=True, exist_ok=True)
    write_random_safety_checkpoint(models / "safety_checker" / "nsfw_image_detection.safetensors",
                                   DEMO_SAFETY_CONFIG)
