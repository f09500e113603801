"""Our CLIP/T5 tokenizers give the ids transformers gives FluxPipeline, and are found where users keep them."""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch

from comfyui_krea.model_loader import ModelFileError
from comfyui_krea.model_loader.text_encoders.tokenization import (
    CLIP_MAX_LENGTH,
    T5_MAX_LENGTH,
    find_tokenizer_folders,
    load_clip_tokenizer,
    load_t5_tokenizer,
)
from reference_tokenizers import TOKENIZERS, needs_tokenizers

pytestmark = needs_tokenizers

WORDS = ["a", "photo", "of", "cat", "dog", "sitting", "on", "the", "red", "chair", "cinematic", "lighting",
         "portrait", "highly", "detailed", "8k", "bokeh", "mountain", "lake", "sunset", "isn't", "we'll", "it's",
         "Hello", "WORLD", "CamelCase", "snake_case", "hyphen-ated", "1024x768", "3.14159", "$100", "50%"]
UNICODE = ["café", "naïve", "crème brûlée", "Ångström", "façade", "São Paulo", "Zürich", "ñandú", "Ελληνικά",
           "Русский", "日本語の文章", "中文提示词", "한국어", "עברית", "العربية", "हिन्दी", "ไทย",
           "e\u0301", "ﬁ ligature", "Ｆｕｌｌｗｉｄｔｈ", "½ ⅔", "™ ©", "①②", "ß", "İstanbul"]
EMOJI = ["😀", "🐱‍👤", "👍🏽", "🇯🇵", "❤️", "🔥🔥🔥", "🧑‍🚀", "✨"]
MARKUP = ["<b>bold</b>", "**strong**", "# Title", "[link](http://x.y/z?q=1&r=2)", "`code`", "{a|b}",
          "(masterpiece:1.2)", "[[nested]]", "<div class=\"x\">", "a\\b", "'quoted'", '"double"', "C++ / C#"]
SPECIAL = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|STARTOFTEXT|>", "</s>", "<pad>", "<unk>",
           "<extra_id_0>", "<extra_id_99>", "<s>", "<|endoftext|>x", "x</s>y", "</s>of", "<pad><pad>"]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "\u00a0", "\u3000", "\u2009", "\u200b"]


def _prompt(rng: random.Random, index: int) -> str:
    pools = [WORDS] * 4 + [UNICODE, EMOJI, MARKUP, SPECIAL]
    length = rng.choice([0, 1, 2, 5, 12, 30, 60]) if index % 10 else rng.choice([150, 400, 700])
    parts = [rng.choice(rng.choice(pools)) for _ in range(length)]
    glue = [rng.choice(SPACES) if rng.random() < 0.3 else " " for _ in parts]
    text = "".join(p + g for p, g in zip(parts, glue))
    if index % 7 == 0:
        text = rng.choice(SPACES) + text  # leading whitespace
    if index % 5 == 0:
        text = text.rstrip()
    return text


def _prompts() -> list[str]:
    rng = random.Random(1234)
    fixed = ["", " ", "\n", "a", "A PHOTO OF A CAT", "a  b", "x\n\ny", "hello   world  ", "</s>", "<pad>",
             "<|endoftext|>", "a photo <|endoftext|> of <|ENDOFTEXT|> x <|STARTOFTEXT|>", "x<pad>y",
             "<extra_id_1>hello", "word " * 600, "日本語 " * 100, "😀" * 90, "supercalifragilistic" * 40]
    return fixed + [_prompt(rng, i) for i in range(240)]


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    clip = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZERS / "clip"))
    t5 = transformers.T5TokenizerFast.from_pretrained(str(TOKENIZERS / "t5"))
    return clip, t5


def _reference_batch(tokenizer, prompts: list[str], max_length: int):
    # The calls FluxPipeline makes (_get_clip_prompt_embeds / _get_t5_prompt_embeds).
    out = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_length=False, return_overflowing_tokens=False, return_tensors="pt")
    return out.input_ids, out.attention_mask


def test_prompt_set_is_varied():
    prompts = _prompts()
    assert len(prompts) >= 200
    assert any(len(p) > 3000 for p in prompts)
    assert any("\n" in p for p in prompts) and any("  " in p for p in prompts)
    assert any(any(e in p for e in EMOJI) for p in prompts)
    assert any("</s>" in p for p in prompts) and any("<|endoftext|>" in p for p in prompts)


def test_clip_ids_match_transformers(reference):
    prompts = _prompts()
    ours = load_clip_tokenizer(TOKENIZERS / "clip")(prompts)
    ids, mask = _reference_batch(reference[0], prompts, CLIP_MAX_LENGTH)
    assert ours.ids.shape == (len(prompts), 77) and ours.ids.dtype == torch.int64
    mismatched = [p for p, a, b in zip(prompts, ours.ids, ids) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    assert torch.equal(ours.attention_mask, mask)
    # Every row starts with <|startoftext|>, has an end token, and is padded with the end token (49407).
    assert (ours.ids[:, 0] == 49406).all() and ((ours.ids == 49407).any(dim=1)).all()
    truncated = ours.attention_mask.sum(dim=1) == 77
    assert truncated.any() and (ours.ids[truncated, -1] == 49407).all()


def test_t5_ids_match_transformers(reference):
    prompts = _prompts()
    ours = load_t5_tokenizer(TOKENIZERS / "t5")(prompts)
    ids, mask = _reference_batch(reference[1], prompts, T5_MAX_LENGTH)
    assert ours.ids.shape == (len(prompts), 512)
    mismatched = [p for p, a, b in zip(prompts, ours.ids, ids) if not torch.equal(a, b)]
    assert not mismatched, f"{len(mismatched)} prompts differ, e.g. {mismatched[:3]!r}"
    assert torch.equal(ours.attention_mask, mask)
    truncated = ours.attention_mask.sum(dim=1) == 512
    assert truncated.any() and (ours.ids[truncated, -1] == 1).all()  # </s> kept at the end
    assert (ours.ids[~truncated, -1] == 0).all()  # padded with <pad> = 0


def test_long_prompts_warn_and_short_ones_do_not(caplog):
    clip = load_clip_tokenizer(TOKENIZERS / "clip")
    t5 = load_t5_tokenizer(TOKENIZERS / "t5")
    with caplog.at_level(logging.WARNING, logger="comfyui_krea.model_loader.text_encoders.tokenization"):
        clip(["a short prompt"])
        t5(["a short prompt"])
        assert not caplog.records
        clip(["word " * 100])
        assert len(caplog.records) == 1 and "CLIP" in caplog.text and "77" in caplog.text
        t5(["word " * 100])
        assert len(caplog.records) == 1  # 100 words fit T5's 512
        t5(["word " * 600])
        assert len(caplog.records) == 2 and "T5" in caplog.text and "512" in caplog.text


def test_single_string_is_refused():
    with pytest.raises(TypeError):
        load_t5_tokenizer(TOKENIZERS / "t5")("a cat")


# ------------------------------------------------------------------------------------------- finding the files

def _copy(kind: str, dest: Path) -> Path:
    shutil.copytree(TOKENIZERS / kind, dest)
    return dest


def test_explicit_folder_with_clip_and_t5(tmp_path):
    _copy("clip", tmp_path / "tok" / "clip")
    _copy("t5", tmp_path / "tok" / "t5")
    found = find_tokenizer_folders(tmp_path / "tok")
    assert found.clip == tmp_path / "tok" / "clip" and found.t5 == tmp_path / "tok" / "t5"


@pytest.mark.parametrize("linked", [False, True], ids=["copies", "links"])
def test_the_documented_layout_is_used_without_a_warning(tmp_path, caplog, linked):
    """--tokenizers DIR with clip/ and t5/, as copies or as links to the folders of a model download (resolved,
    they lie outside DIR): what was given is used, silently."""
    for kind in ("clip", "t5"):
        if linked:
            (tmp_path / "tok").mkdir(exist_ok=True)
            (tmp_path / "tok" / kind).symlink_to(_copy(kind, tmp_path / "download" / kind), target_is_directory=True)
        else:
            _copy(kind, tmp_path / "tok" / kind)
    with caplog.at_level("WARNING"):
        found = find_tokenizer_folders(tmp_path / "tok")
    assert found.clip == tmp_path / "tok" / "clip" and found.t5 == tmp_path / "tok" / "t5"
    assert caplog.records == []


def test_a_tokenizer_found_outside_the_given_folder_is_named(tmp_path, caplog):
    _copy("clip", tmp_path / "tok" / "clip")
    with caplog.at_level("WARNING"):
        found = find_tokenizer_folders(tmp_path / "tok", extra_dirs=[{"t5": _copy("t5", tmp_path / "comfy_t5")}])
    assert found.t5 == tmp_path / "comfy_t5"
    assert [r.getMessage() for r in caplog.records] == [
        f"No T5 tokenizer in {tmp_path / 'tok'}; using the one in {tmp_path / 'comfy_t5'}."]


def test_comfyui_layout_and_extra_dirs(tmp_path):
    comfy = tmp_path / "comfy"
    _copy("clip", comfy / "sd1_tokenizer")
    _copy("t5", comfy / "text_encoders" / "t5_tokenizer")
    found = find_tokenizer_folders(comfy)
    assert found.clip == comfy / "sd1_tokenizer" and found.t5 == comfy / "text_encoders" / "t5_tokenizer"
    extra = {"clip": comfy / "sd1_tokenizer", "t5": comfy / "text_encoders" / "t5_tokenizer"}
    assert find_tokenizer_folders(None, tmp_path / "a.safetensors", tmp_path / "b.safetensors", [extra]) == found


def test_diffusers_siblings_are_found(tmp_path):
    root = tmp_path / "FLUX.1-dev"
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder_2").mkdir()
    _copy("clip", root / "tokenizer")
    _copy("t5", root / "tokenizer_2")
    by_folder = find_tokenizer_folders(None, root / "text_encoder", root / "text_encoder_2")
    by_file = find_tokenizer_folders(None, root / "text_encoder" / "model.safetensors",
                                     root / "text_encoder_2" / "model-00001-of-00002.safetensors")
    by_root = find_tokenizer_folders(None, root, root)
    for found in (by_folder, by_file, by_root):
        assert found.clip == root / "tokenizer" and found.t5 == root / "tokenizer_2"


def test_missing_tokenizers_list_every_place(tmp_path):
    (tmp_path / "tok" / "clip").mkdir(parents=True)
    (tmp_path / "tok" / "clip" / "vocab.json").write_text("{}")  # merges.txt missing
    extra = {"clip": tmp_path / "comfy_clip", "t5": tmp_path / "comfy_t5"}
    with pytest.raises(ModelFileError) as info:
        find_tokenizer_folders(tmp_path / "tok", tmp_path / "m" / "text_encoder", tmp_path / "m" / "text_encoder_2",
                               [extra])
    message = str(info.value)
    for place in (tmp_path / "tok" / "clip", tmp_path / "tok" / "t5", tmp_path / "m" / "tokenizer",
                  tmp_path / "m" / "tokenizer_2", tmp_path / "comfy_clip", tmp_path / "comfy_t5"):
        assert str(place) in message
    assert "vocab.json" in message and "tokenizer.json" in message


def test_a_file_of_the_wrong_tokenizer_is_refused(tmp_path):
    # T5's folder holding a BPE tokenizer.json (another model's), and a CLIP vocabulary without CLIP's tokens.
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}))
    with pytest.raises(ModelFileError, match="not a T5 tokenizer"):
        load_t5_tokenizer(t5)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "vocab.json").write_text(json.dumps({"a": 0}))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelFileError, match="not a CLIP vocabulary"):
        load_clip_tokenizer(clip)
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_t5_tokenizer(tmp_path / "nowhere")
