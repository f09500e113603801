"""The checkpoint layer: one resolver (files, folders, shards, diffusers sub-folders, variants), one file
identifier (what kind of model a file holds), one atomic writer, and the node side's folder wording."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_krea.model_loader import FileKind, ModelFileError, identify, open_checkpoint
from comfyui_krea.model_loader.checkpoints import save_tensors, write_safetensors
from comfyui_krea.nodes.host import KIND_FOLDERS, with_folders


def _file(path, keys, value=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.full((2,), value) for k in keys}, str(path))
    return path


def _sharded(folder, shards, stem="model", variant=""):
    """Shards of one key each, and the index naming them (diffusers' file names)."""
    weight_map = {}
    for i in range(shards):
        name = f"{stem}{variant}-{i + 1:05d}-of-{shards:05d}.safetensors"
        _file(folder / name, [f"{variant or 'main'}.{i}"])
        weight_map[f"{variant or 'main'}.{i}"] = name
    index = folder / f"{stem}.safetensors.index{variant}.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def test_file_and_missing_file(tmp_path):
    path = _file(tmp_path / "a.safetensors", ["x"])
    ckpt = open_checkpoint(path)
    assert ckpt.keys() == ["x"] and ckpt.path == path
    with pytest.raises(ModelFileError, match="not found"):
        open_checkpoint(tmp_path / "nope.safetensors")


def test_diffusers_root_gives_its_subfolder(tmp_path):
    _file(tmp_path / "model" / "vae" / "diffusion_pytorch_model.safetensors", ["vae.key"])
    _file(tmp_path / "model" / "transformer" / "diffusion_pytorch_model.safetensors", ["dit.key"])
    assert open_checkpoint(tmp_path / "model", "vae").keys() == ["vae.key"]
    assert open_checkpoint(tmp_path / "model", "transformer").path == tmp_path / "model" / "transformer"


def test_sharded_folder_reads_exactly_the_indexed_shards_not_variants(tmp_path):
    # diffusers keeps fp16 variant shards beside the main ones: mixing them in would load wrong weights
    # (the text encoders' old resolver globbed every *.safetensors of the folder).
    folder = tmp_path / "text_encoder_2"
    _sharded(folder, 2)
    _sharded(folder, 2, variant=".fp16")
    ckpt = open_checkpoint(folder)
    assert sorted(ckpt.keys()) == ["main.0", "main.1"]
    # One shard given as the file: the whole indexed folder, still without the variant.
    shard = folder / "model-00001-of-00002.safetensors"
    assert sorted(open_checkpoint(shard).keys()) == ["main.0", "main.1"]


def test_single_file_folder_prefers_main_weights_over_variants(tmp_path):
    folder = tmp_path / "vae"
    _file(folder / "diffusion_pytorch_model.safetensors", ["main"])
    _file(folder / "diffusion_pytorch_model.fp16.safetensors", ["half"])
    assert open_checkpoint(folder).keys() == ["main"]
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert open_checkpoint(folder).keys() == ["half"]  # a lone variant is used
    _file(folder / "diffusion_pytorch_model.bf16.safetensors", ["bf16"])
    with pytest.raises(ModelFileError, match="only variant weights"):
        open_checkpoint(folder)


def test_missing_shard_and_broken_index_are_named(tmp_path):
    folder = tmp_path / "t"
    _sharded(folder, 3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelFileError, match="lacks 1 of the 3 shards .*model-00002-of-00003"):
        open_checkpoint(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable safetensors index"):
        open_checkpoint(folder)
    with pytest.raises(ModelFileError, match="holds no .safetensors"):
        open_checkpoint((tmp_path / "empty").mkdir() or tmp_path / "empty")


KINDS = {
    FileKind.FLUX_TRANSFORMER: ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"],
    FileKind.CHROMA: ["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"],
    FileKind.SD_UNET: ["model.diffusion_model.input_blocks.0.0.weight"],
    FileKind.SD3_MMDIT: ["joint_blocks.0.x_block.attn.qkv.weight"],
    FileKind.BUNDLE: ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"],
    FileKind.LORA: ["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"],
    FileKind.VAE: ["encoder.down.0.block.0.conv1.weight", "decoder.up.0.block.0.conv1.weight"],
    FileKind.PREVIEW_VAE: ["decoder.layers.3.conv.0.weight", "encoder.layers.0.weight"],
    FileKind.CLIP_TEXT: ["text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.mlp.fc1.weight"],
    FileKind.T5_TEXT: ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"],
    FileKind.CLIP_VISION: ["vision_model.embeddings.class_embedding"],
    FileKind.SD_SAFETY_CHECKER: ["vision_model.vision_model.embeddings.class_embedding", "concept_embeds"],
    FileKind.VIT_CLASSIFIER: ["vit.embeddings.cls_token", "classifier.weight"],
    FileKind.VIT_BACKBONE: ["embeddings.cls_token", "encoder.layer.0.attention.attention.query.weight"],
    FileKind.OTHER_TRANSFORMER: ["transformer_blocks.0.attn1.to_q.weight"],
    FileKind.UNKNOWN: ["foo.weight"],
}


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.name)
def test_identify(kind):
    assert identify(KINDS[kind]) is kind


def test_a_t5_gguf_in_llama_cpps_names_is_a_t5():
    assert identify(["token_embd.weight", "enc.blk.0.attn_q.weight", "enc.output_norm.weight"]) is FileKind.T5_TEXT


def test_transformers_clip_without_prefix_is_not_a_preview_vae():
    # transformers' CLIPTextModel keys have no `text_model.` prefix and contain "encoder.layers."
    assert identify(["embeddings.token_embedding.weight", "encoder.layers.0.self_attn.q_proj.weight"]) \
        is FileKind.CLIP_TEXT


def test_node_side_adds_the_folders():
    err = ModelFileError("x.safetensors is a LoRA, not a FLUX.1 transformer.", found=FileKind.LORA,
                         expected=FileKind.FLUX_TRANSFORMER)
    message = str(with_folders(err))
    assert message.startswith("x.safetensors is a LoRA")
    assert "LoRA files belong in models/loras; FLUX transformer files in models/diffusion_models." in message
    assert str(with_folders(ModelFileError("plain"))) == "plain"
    assert set(KIND_FOLDERS.values()) >= {"diffusion_models", "vae", "text_encoders", "safety_checker"}


def test_a_wrong_file_in_the_loader_node_names_both_folders(tmp_path):
    from comfyui_krea.nodes.host import VaeHandle, forget_loaded

    path = _file(tmp_path / "clip_l.safetensors", KINDS[FileKind.CLIP_TEXT])
    with pytest.raises(ModelFileError) as err:
        VaeHandle(path, torch.device("cpu")).load()
    forget_loaded()
    assert "looks like a CLIP text encoder" in str(err.value)
    assert "models/text_encoders" in str(err.value) and "models/vae" in str(err.value)


def test_writer_streams_atomically_and_round_trips(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.float8_e4m3fn)}
    path = save_tensors(tmp_path / "sub" / "x.safetensors", tensors, {"format": "pt"})
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8)) for k, v in tensors.items())

    def fail():
        raise RuntimeError("made no tensor")

    entries = [("a", torch.float32, (2,), lambda: torch.zeros(2)), ("b", torch.float32, (2,), fail)]
    with pytest.raises(RuntimeError):
        write_safetensors(tmp_path / "y.safetensors", entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no half-written file, no .partial left
