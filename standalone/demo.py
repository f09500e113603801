"""`--demo`: small random-weight models and toy tokenizers, in the real file layouts and names.

They prove that the install, the loaders, the nodes and the shipped workflows run on this machine. The
images they make are noise: no trained weights are involved.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import Unigram

from ..model_loader.autoencoder import AutoEncoderConfig, write_random_autoencoder_checkpoint
from ..model_loader.flux import FluxConfig, write_random_flux_checkpoint
from ..model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
from ..model_loader.text_encoders import (
    CLIPTextConfig,
    T5EncoderConfig,
    write_random_clip_checkpoint,
    write_random_t5_checkpoint,
)

# Small enough to run a whole workflow on a laptop CPU in seconds; sizes as the CLI options name them.
DEMO_SETTINGS = {"width": 256, "height": 256, "steps": 4}

WIDTH = 64  # CLIP width = FLUX vec_in_dim; T5 d_model = FLUX context_in_dim
DEMO_FLUX = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=WIDTH, context_in_dim=WIDTH, hidden_size=64,
                       num_heads=4, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6))


def write_toy_clip_tokenizer(folder: Path) -> int:
    """A byte-level BPE vocabulary with no merges (one token per byte), in CLIP's file format."""
    from tokenizers.pre_tokenizers import ByteLevel

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)  # <|endoftext|> is the last id, as in CLIP-L's vocabulary


def write_toy_t5_tokenizer(folder: Path) -> int:
    """A unigram model over single characters, with T5's special tokens, in tokenizer.json format."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in chars]
    vocab += [("▁" + c, -2.5) for c in chars]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.save(str(folder / "tokenizer.json"))
    return len(vocab)


def write_demo_models(root: Path) -> tuple[Path, Path]:
    """Writes models/ (ComfyUI layout, the file names the shipped workflows use) and tokenizers/ under root."""
    models, tokenizers = root / "models", root / "tokenizers"
    clip_vocab = write_toy_clip_tokenizer(tokenizers / "clip")
    t5_vocab = write_toy_t5_tokenizer(tokenizers / "t5")
    for sub in ("diffusion_models", "text_encoders", "vae", "safety_checker"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    write_random_flux_checkpoint(models / "diffusion_models" / "flux1-krea-dev.safetensors", DEMO_FLUX, seed=0,
                                 dtype=torch.bfloat16)
    write_random_clip_checkpoint(models / "text_encoders" / "clip_l.safetensors",
                                 CLIPTextConfig(vocab_size=clip_vocab, width=WIDTH, layers=2, intermediate=128,
                                                positions=77, eos_token_id=clip_vocab - 1), seed=1)
    write_random_t5_checkpoint(models / "text_encoders" / "t5xxl_fp16.safetensors",
                               T5EncoderConfig(vocab_size=t5_vocab, d_model=WIDTH, d_kv=16, heads=4, d_ff=128,
                                               layers=2), seed=2, dtype=torch.float16)
    write_random_autoencoder_checkpoint(models / "vae" / "ae.safetensors",
                                        AutoEncoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1), seed=3)
    write_random_safety_checkpoint(models / "safety_checker" / "nsfw_image_detection.safetensors",
                                   DEMO_SAFETY_CONFIG, seed=4, bias_towards="normal")
    return models, tokenizers
