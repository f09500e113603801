"""What `--demo` writes (standalone/demo.py): the ComfyUI model folders under the file names the shipped workflows
use, each model the small random-weight architecture (and seed, and dtype) it is documented as, and toy CLIP and
T5 tokenizers that the pack's tokenizer loaders read as CLIP's and T5's formats."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfyui_krea.model_loader.autoencoder import AutoEncoderConfig, write_random_autoencoder_checkpoint
from comfyui_krea.model_loader.flux import FluxConfig, write_random_flux_checkpoint
from comfyui_krea.model_loader.safety_checker import DEMO_SAFETY_CONFIG, write_random_safety_checkpoint
from comfyui_krea.model_loader.text_encoders import (
    CLIPTextConfig,
    T5EncoderConfig,
    write_random_clip_checkpoint,
    write_random_t5_checkpoint,
)
from comfyui_krea.model_loader.text_encoders.tokenization import load_clip_tokenizer, load_t5_tokenizer
from comfyui_krea.standalone.demo import write_demo_models, write_toy_clip_tokenizer, write_toy_t5_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# The demo's models as their documentation states them: FLUX's layout at width 64 (bfloat16, as the real
# checkpoint), CLIP-L and T5 v1.1 layouts whose widths are FLUX's vec_in_dim and context_in_dim, vocabularies the
# size of the toy tokenizers (CLIP's end token the last id), T5 in float16 (as t5xxl_fp16), a 4-level VAE, and a
# classifier leaning to "normal" so that the demo's noise is not blacked out. Seeds 0..4, one per model.
CLIP_VOCAB, T5_VOCAB = 2 * 256 + 2, 4 + 2 * 94  # bytes and bytes + "</w>", 2 specials; T5: 4 specials + 2 x ASCII
EXPECTED = {
    "diffusion_models/flux1-krea-dev.safetensors": lambda path: write_random_flux_checkpoint(
        path, FluxConfig(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=64,
                         num_heads=4, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6)),
        seed=0, dtype=torch.bfloat16),
    "text_encoders/clip_l.safetensors": lambda path: write_random_clip_checkpoint(
        path, CLIPTextConfig(vocab_size=CLIP_VOCAB, width=64, layers=2, intermediate=128, positions=77,
                             eos_token_id=CLIP_VOCAB - 1), seed=1),
    "text_encoders/t5xxl_fp16.safetensors": lambda path: write_random_t5_checkpoint(
        path, T5EncoderConfig(vocab_size=T5_VOCAB, d_model=64, d_kv=16, heads=4, d_ff=128, layers=2), seed=2,
        dtype=torch.float16),
    "vae/ae.safetensors": lambda path: write_random_autoencoder_checkpoint(
        path, AutoEncoderConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1), seed=3),
    "safety_checker/nsfw_image_detection.safetensors": lambda path: write_random_safety_checkpoint(
        path, DEMO_SAFETY_CONFIG, seed=4, bias_towards="normal"),
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert write_demo_models(root) == (root / "models", root / "tokenizers")
    return root


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_demo_writes_comfyuis_model_folders_under_the_names_the_shipped_workflows_use(demo_root):
    files = [f"models/{name}" for name in EXPECTED] + ["tokenizers/clip/merges.txt", "tokenizers/clip/vocab.json",
                                                       "tokenizers/t5/tokenizer.json"]
    folders = {path.rsplit("/", i)[0] for path in files for i in (1, 2)}  # and nothing else, no stray folder
    assert sorted(p.relative_to(demo_root).as_posix() for p in demo_root.rglob("*")) == sorted([*files, *folders])
    # Every model file a shipped workflow names is there, so `run workflows/api/... --demo` finds it.
    demo_names = {name.rsplit("/", 1)[1] for name in EXPECTED}
    for workflow in (ROOT / "workflows" / "api").glob("*.json"):
        named = set(re.findall(r'"([^"/]+\.safetensors)"', workflow.read_text()))
        assert named and named <= demo_names, workflow.name


def test_each_demo_model_is_its_documented_architecture_seed_and_dtype(demo_root, tmp_path):
    # The writers are deterministic: the same config, seed and dtype give the same bytes.
    for name, write in EXPECTED.items():
        expected = write(tmp_path / name.replace("/", "_"))
        assert (demo_root / "models" / name).read_bytes() == expected.read_bytes(), name


def test_the_demo_text_encoders_fit_the_demo_transformer_and_the_toy_tokenizers(demo_root):
    def shape(name: str, key: str) -> tuple[int, ...]:
        with safe_open(str(demo_root / "models" / name), "pt") as f:
            return tuple(f.get_slice(key).get_shape())

    flux = "diffusion_models/flux1-krea-dev.safetensors"
    clip_width = shape("text_encoders/clip_l.safetensors", "text_model.final_layer_norm.weight")[0]
    t5_width = shape("text_encoders/t5xxl_fp16.safetensors", "encoder.final_layer_norm.weight")[0]
    assert shape(flux, "vector_in.in_layer.weight")[1] == clip_width  # CLIP's pooled output feeds vector_in
    assert shape(flux, "txt_in.weight")[1] == t5_width  # T5's tokens feed txt_in
    # One embedding row per token id of each tokenizer, nothing out of range.
    tokenizers = demo_root / "tokenizers"
    assert shape("text_encoders/clip_l.safetensors", "text_model.embeddings.token_embedding.weight")[0] == \
        load_clip_tokenizer(tokenizers / "clip").vocab_size == CLIP_VOCAB
    assert shape("text_encoders/t5xxl_fp16.safetensors", "shared.weight")[0] == \
        load_t5_tokenizer(tokenizers / "t5").vocab_size == T5_VOCAB


def test_writing_the_demo_again_into_the_same_folder_gives_the_same_files(demo_root, tmp_path):
    # `run --demo` and `serve --demo` may be pointed at a folder the demo was written to before.
    again = tmp_path / "again"
    write_demo_models(again)
    first = files_under(again)
    assert write_demo_models(again) == (again / "models", again / "tokenizers")
    assert files_under(again) == first == files_under(demo_root)


def test_the_toy_clip_tokenizer_has_one_token_per_byte_and_marks_word_ends(tmp_path):
    folder = tmp_path / "nested" / "clip"  # parent folders are made too
    assert write_toy_clip_tokenizer(folder) == CLIP_VOCAB
    assert write_toy_clip_tokenizer(folder) == CLIP_VOCAB  # written again over itself
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(CLIP_VOCAB))
    assert vocab["<|startoftext|>"] == CLIP_VOCAB - 2 and vocab["<|endoftext|>"] == CLIP_VOCAB - 1  # as CLIP-L
    assert (folder / "merges.txt").read_text() == "#version: 0.2\n"  # no merges: CLIP's header line only
    tokens = {i: t for t, i in vocab.items()}
    ids = load_clip_tokenizer(folder)(["A fox, é!"]).ids[0].tolist()
    # Lower-cased, one token per byte ("é" is two UTF-8 bytes, in byte-level BPE's alphabet), "</w>" on each
    # word's last byte, then the end token padding to 77.
    assert [tokens[i] for i in ids[:10]] == ["<|startoftext|>", "a</w>", "f", "o", "x</w>", ",</w>", "Ã", "©</w>",
                                            "!</w>", "<|endoftext|>"]
    assert ids[9:] == [CLIP_VOCAB - 1] * 68


def test_the_toy_t5_tokenizer_splits_words_into_a_word_start_and_single_characters(tmp_path):
    folder = tmp_path / "nested" / "t5"
    assert write_toy_t5_tokenizer(folder) == T5_VOCAB
    assert write_toy_t5_tokenizer(folder) == T5_VOCAB
    tokenizer = load_t5_tokenizer(folder)
    pieces = [piece for piece, _ in json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
              ["vocab"]]
    assert pieces[:4] == ["<pad>", "</s>", "<unk>", "▁"]  # T5's ids: pad 0, end 1, unknown 2

    def tokens(prompt: str) -> list[str]:
        ids = tokenizer([prompt]).ids[0].tolist()
        return [pieces[i] for i in ids[: ids.index(1) + 1]]

    # "▁" + the first character is one piece, the rest one piece per character; "!" and "~" (ASCII 33 and 126,
    # the ends of the printable range) are pieces, anything else is <unk> after a bare word start.
    assert tokens("a fox!") == ["▁a", "▁f", "o", "x", "!", "</s>"]
    assert tokens("~b !c") == ["▁~", "b", "▁!", "c", "</s>"]
    assert tokens("é fox \x7f") == ["▁", "<unk>", "▁f", "o", "x", "▁", "<unk>", "</s>"]
    assert tokenizer(["a"]).ids[0].tolist()[2:] == [0] * 510  # padded with <pad> to 512
