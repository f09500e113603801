"""LoRAs merged by the pack against diffusers/peft on diffusers' FluxTransformer2DModel, same weights, same files.

The base is a reduced FLUX with unequal depths (2 double, 3 single blocks) written once in the BFL layout (the
pack's) and once in diffusers' (diffusers' model). Each LoRA file is loaded by diffusers the way its pipelines
do (FluxPipeline.lora_state_dict converts kohya, OneTrainer and XLabs files to peft's names; the adapters run
beside the layers in peft) and merged by the pack; the two transformers must then compute the same velocity.
diffusers' converters of kohya and OneTrainer files cover only part of the layers (of kohya's, the blocks but for
the single blocks' linear1, which it splits at FLUX.1's full width only; of OneTrainer's, attention and the
embedders): those files leave the rest out here, and the ComfyUI host test (test_lora_comfyui.py) checks them
whole.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file
from test_flux_parity import diffusers_model, make_inputs, run_diffusers

from comfyui_krea.model_loader.flux import FluxConfig, load_flux, write_random_flux_checkpoint
from comfyui_krea.model_loader.lora import LoraChoice, restore_base, set_loras
from conftest import rel_err
from lora_files import write_lora

pytest.importorskip("peft", reason="the diffusers/peft oracle needs peft: pip install -e '.[test]'")

# 2 double and 3 single blocks: a mapping that swaps block kinds or indices cannot pass.
UNEQUAL = FluxConfig(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=32, hidden_size=32, num_heads=2,
                     depth=2, depth_single_blocks=3, axes_dim=(4, 6, 6))


def onetrainer_converted(module: str) -> bool:  # what diffusers' OneTrainer converter maps
    return ".attn." in module or "blocks" not in module


def kohya_converted(layer: str) -> bool:
    # diffusers splits linear1 with FLUX.1's full widths written in, drops the embedders' LoRAs (its converter
    # names them without the `transformer.` prefix it then filters on) and leaves the final layer's alpha out.
    return layer.startswith(("double_blocks.", "single_blocks.")) and not layer.endswith(".linear1")


CASES = {  # name -> (format, which modules the file holds)
    "diffusers": ("diffusers", None),
    "diffusers with alphas": ("diffusers_alpha", None),
    "kohya": ("kohya", kohya_converted),
    "onetrainer": ("onetrainer", onetrainer_converted),
    "xlabs": ("xlabs", None),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_parity")
    write_random_flux_checkpoint(folder / "bfl.safetensors", UNEQUAL, seed=3)
    write_random_flux_checkpoint(folder / "diffusers.safetensors", UNEQUAL, seed=3, layout="diffusers")
    return folder


@pytest.fixture(scope="module")
def ours(folder):
    return load_flux(folder / "bfl.safetensors")


def theirs_with(folder, loras: list[tuple[str, float]]):
    """diffusers' transformer on the same weights with each LoRA file loaded as a peft adapter at its strength."""
    model = diffusers_model(UNEQUAL)
    model.load_state_dict(load_file(folder / "diffusers.safetensors"), strict=True)
    names = []
    for i, (path, _) in enumerate(loras):
        state, alphas = FluxPipeline.lora_state_dict(path, return_alphas=True)
        FluxPipeline.load_lora_into_transformer(state, network_alphas=alphas, transformer=model, adapter_name=f"l{i}")
        names.append(f"l{i}")
    model.set_adapters(names, weights=[strength for _, strength in loras])
    return model


def velocities(ours, theirs, seed: int = 0):
    img, img_ids, txt, txt_ids, y = make_inputs(2, 3, 4, txt_len=5, seed=seed)
    t, g = torch.tensor([0.7, 0.3]), torch.tensor([3.5, 4.5])
    with torch.no_grad():
        mine = ours.forward_orig(img, img_ids, txt, txt_ids, t, y, g)
    return mine, run_diffusers(theirs, img, img_ids, txt, txt_ids, t, y, g)


@pytest.mark.parametrize("case", CASES)
def test_a_lora_merged_by_the_pack_computes_what_peft_computes(folder, ours, case):
    fmt, keep = CASES[case]
    path = str(write_lora(folder / f"lora_{fmt}.safetensors", UNEQUAL, fmt, seed=11, keep=keep))
    theirs = theirs_with(folder, [(path, 0.8)])
    set_loras(ours, [LoraChoice(path, 0.8)])
    try:
        mine, reference = velocities(ours, theirs)
    finally:
        restore_base(ours)
    assert rel_err(mine, reference) < 1e-5
    base, _ = velocities(ours, theirs)
    assert rel_err(base, reference) > 0.05  # the LoRA changes the result: the comparison is not of base models


def test_two_loras_with_their_strengths_stack_as_peft_adapters(folder, ours):
    first = str(write_lora(folder / "lora_a.safetensors", UNEQUAL, "diffusers", seed=21))
    second = str(write_lora(folder / "lora_b.safetensors", UNEQUAL, "xlabs", seed=22))
    theirs = theirs_with(folder, [(first, 0.7), (second, -0.4)])
    set_loras(ours, [LoraChoice(first, 0.7), LoraChoice(second, -0.4)])
    try:
        mine, reference = velocities(ours, theirs, seed=1)
    finally:
        restore_base(ours)
    assert rel_err(mine, reference) < 1e-5
    set_loras(ours, [LoraChoice(first, 0.7)])  # the second one matters
    try:
        one, _ = velocities(ours, theirs, seed=1)
    finally:
        restore_base(ours)
    assert rel_err(one, reference) > 0.02
