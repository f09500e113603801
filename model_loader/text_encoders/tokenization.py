"""CLIP-L and T5 tokenizers for FLUX prompts, through the `tokenizers` library.

Both give fixed-length id tensors exactly as diffusers' FluxPipeline asks transformers (5.x) for them:
CLIP `padding="max_length", max_length=77, truncation=True` and T5 the same with 512. The pipelines below
rebuild what transformers' CLIPTokenizer and T5Tokenizer set up from the same files, so the ids match them.

Where the files are found (`find_tokenizer_folders`), first hit wins:
1. the folder the user names: its `clip/` and `t5/` sub-folders, diffusers' `tokenizer/` and `tokenizer_2/`,
   ComfyUI's `sd1_tokenizer/` and `text_encoders/t5_tokenizer/` (so ComfyUI's `comfy/` folder works),
   or the files directly in it;
2. the `tokenizer/` and `tokenizer_2/` folders of a diffusers-layout model beside the text encoder files;
3. extra folders the caller passes (the node side passes the ones ComfyUI ships).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import ModelFileError

log = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

CLIP_FILES = ("vocab.json", "merges.txt")
T5_FILES = ("tokenizer.json",)

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"  # also CLIP-L's pad token (id 49407), as in its tokenizer_config.json
# CLIP's word splitting: its two special tokens, English contractions, letter runs, single digits, symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

_T5_EOS = "</s>"
_T5_PAD = "<pad>"


@dataclass(frozen=True)
class TokenBatch:
    """Token ids (B, max_length) int64 and the padding mask (B, max_length) int64, 1 = real token.

    FLUX passes no attention mask to either encoder (CLIP attends causally over the padding, T5 over all
    512 positions); the mask is kept for callers that want it.
    """
    ids: torch.Tensor
    attention_mask: torch.Tensor


class FixedLengthTokenizer:
    """Tokenizes prompts to exactly `max_length` ids: truncated (end token kept) and padded."""

    def __init__(self, tokenizer: Tokenizer, name: str, max_length: int, pad_id: int, pad_token: str,
                 source: Path) -> None:
        self.name = name
        self.max_length = max_length
        self.pad_id = pad_id
        self.source = source
        self._tokenizer = tokenizer
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, prompts: Sequence[str]) -> TokenBatch:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        encodings = self._tokenizer.encode_batch(list(prompts))
        for index, encoding in enumerate(encodings):
            if encoding.overflowing:
                dropped = sum(len(o.ids) for o in encoding.overflowing)
                log.warning(
                    "Prompt %d is longer than the %s limit of %d tokens: the last %d tokens were cut off "
                    "and do not affect the image.", index, self.name, self.max_length, dropped,
                )
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64).reshape(len(encodings), self.max_length)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).reshape(ids.shape)
        return TokenBatch(ids, mask)


def load_clip_tokenizer(folder: str | os.PathLike[str], max_length: int = CLIP_MAX_LENGTH) -> FixedLengthTokenizer:
    """CLIP's byte-level BPE (lower-cased, `</w>` word ends) from `vocab.json` + `merges.txt`."""
    folder = Path(folder)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise ModelFileError(f"CLIP tokenizer file missing: {path}. The folder needs vocab.json and merges.txt.")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{vocab_path} is not a readable JSON vocabulary ({exc}).") from None
    if not isinstance(vocab, dict) or _CLIP_BOS not in vocab or _CLIP_EOS not in vocab:
        raise ModelFileError(
            f"{vocab_path} is not a CLIP vocabulary (it lacks {_CLIP_BOS} / {_CLIP_EOS}). "
            "Use the tokenizer files of openai/clip-vit-large-patch14 (the `tokenizer/` folder of FLUX.1-dev)."
        )
    merges = _read_merges(merges_path)

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=_CLIP_EOS))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # transformers registers the start token as a normalized special token and the end token as a raw one,
    # so "<|STARTOFTEXT|>" in a prompt becomes the start id but "<|ENDOFTEXT|>" stays text.
    tokenizer.add_special_tokens([
        AddedToken(_CLIP_BOS, normalized=True, special=True),
        AddedToken(_CLIP_EOS, normalized=False, special=True),
    ])
    bos_id, eos_id = vocab[_CLIP_BOS], vocab[_CLIP_EOS]
    tokenizer.post_processor = processors.RobertaProcessing(
        (_CLIP_EOS, eos_id), (_CLIP_BOS, bos_id), trim_offsets=False, add_prefix_space=False)
    return FixedLengthTokenizer(tokenizer, "CLIP", max_length, pad_id=eos_id, pad_token=_CLIP_EOS, source=folder)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ModelFileError(f"{path} line {line_number} is not a BPE merge ('a b'): {line!r}.")
        merges.append((parts[0], parts[1]))
    return merges


def load_t5_tokenizer(folder: str | os.PathLike[str], max_length: int = T5_MAX_LENGTH) -> FixedLengthTokenizer:
    """T5's unigram tokenizer from `tokenizer.json`, `</s>` appended, padded with `<pad>` (id 0)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(f"T5 tokenizer file missing: {path}. The folder needs tokenizer.json.")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        model_type = json.loads(path.read_text(encoding="utf-8"))["model"]["type"]
    except Exception as exc:  # tokenizers reports unreadable files as plain Exception
        raise ModelFileError(f"{path} is not a readable tokenizers file ({exc}).") from None
    eos_id, pad_id = tokenizer.token_to_id(_T5_EOS), tokenizer.token_to_id(_T5_PAD)
    if model_type != "Unigram" or eos_id is None or pad_id is None:
        raise ModelFileError(
            f"{path} is not a T5 tokenizer (model {model_type}, needs a Unigram model with </s> and <pad>). "
            "Use the tokenizer of google/t5-v1_1-xxl (the `tokenizer_2/` folder of FLUX.1-dev)."
        )
    # transformers 5.x keeps the file's vocabulary and sentencepiece normalization but splits on whitespace
    # and marks every word start with "▁" (also after a special token), and drops the file's whitespace
    # folding (that only matters next to special tokens); mirror it so the ids match.
    normalizer = tokenizer.normalizer
    if isinstance(normalizer, normalizers.Sequence):
        precompiled = [n for n in _sequence_items(normalizer) if isinstance(n, normalizers.Precompiled)]
        tokenizer.normalizer = precompiled[0] if precompiled else None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", _T5_EOS], pair=["$A", _T5_EOS, "$B", _T5_EOS], special_tokens=[(_T5_EOS, eos_id)])
    return FixedLengthTokenizer(tokenizer, "T5", max_length, pad_id=pad_id, pad_token=_T5_PAD, source=folder)


def _sequence_items(sequence: normalizers.Sequence) -> Iterable[normalizers.Normalizer]:
    index = 0
    while True:
        try:
            yield sequence[index]
        except IndexError:
            return
        index += 1


# ----------------------------------------------------------------------------------------------- finding files

@dataclass(frozen=True)
class TokenizerFolders:
    clip: Path
    t5: Path


_EXPLICIT_CLIP = ("clip", "tokenizer", "sd1_tokenizer", ".")
_EXPLICIT_T5 = ("t5", "tokenizer_2", "text_encoders/t5_tokenizer", ".")


def _diffusers_sibling(model_path: Path, encoder_folder: str, tokenizer_folder: str) -> list[Path]:
    """Where a diffusers model keeps the tokenizer of the text encoder at `model_path`."""
    if model_path.is_dir() and (model_path / encoder_folder).is_dir():  # the model root itself
        return [model_path / tokenizer_folder]
    is_file = model_path.is_file() or model_path.suffix in (".safetensors", ".sft")
    encoder_folder_path = model_path.parent if is_file else model_path
    return [encoder_folder_path.parent / tokenizer_folder]


def find_tokenizer_folders(
    tokenizer_dir: str | os.PathLike[str] | None,
    clip_path: str | os.PathLike[str] | None = None,
    t5_path: str | os.PathLike[str] | None = None,
    extra_dirs: Iterable[Mapping[str, str | os.PathLike[str]]] = (),
) -> TokenizerFolders:
    """The CLIP and T5 tokenizer folders, or a ModelFileError listing every place looked at."""
    clip_candidates: list[Path] = []
    t5_candidates: list[Path] = []
    if tokenizer_dir is not None:
        root = Path(tokenizer_dir)
        clip_candidates += [root / sub for sub in _EXPLICIT_CLIP]
        t5_candidates += [root / sub for sub in _EXPLICIT_T5]
    given = {"CLIP": list(clip_candidates), "T5": list(t5_candidates)}  # inside the folder the user named
    if clip_path is not None:
        clip_candidates += _diffusers_sibling(Path(clip_path), "text_encoder", "tokenizer")
    if t5_path is not None:
        t5_candidates += _diffusers_sibling(Path(t5_path), "text_encoder_2", "tokenizer_2")
    for extra in extra_dirs:
        if extra.get("clip") is not None:
            clip_candidates.append(Path(extra["clip"]))
        if extra.get("t5") is not None:
            t5_candidates.append(Path(extra["t5"]))

    clip = _first_with(clip_candidates, CLIP_FILES)
    t5 = _first_with(t5_candidates, T5_FILES)
    if clip is None or t5 is None:
        problems = []
        if clip is None:
            problems.append(_not_found("CLIP", CLIP_FILES, clip_candidates))
        if t5 is None:
            problems.append(_not_found("T5", T5_FILES, t5_candidates))
        raise ModelFileError(
            " ".join(problems) + " Give a tokenizer folder holding clip/ (vocab.json, merges.txt) and t5/ "
            "(tokenizer.json), e.g. the tokenizer/ and tokenizer_2/ folders of black-forest-labs/FLUX.1-dev, "
            "or run the pack inside ComfyUI, which ships both."
        )
    if tokenizer_dir is not None:
        # By the folder's place in the list, not by its resolved path: clip/ and t5/ may be links to elsewhere.
        for kind, found in (("CLIP", clip), ("T5", t5)):
            if found not in given[kind]:
                log.warning("No %s tokenizer in %s; using the one in %s.", kind, tokenizer_dir, found)
    return TokenizerFolders(clip=clip, t5=t5)


def _first_with(candidates: Sequence[Path], files: Sequence[str]) -> Path | None:
    for folder in candidates:
        if all((folder / name).is_file() for name in files):
            return folder
    return None


def _not_found(kind: str, files: Sequence[str], candidates: Sequence[Path]) -> str:
    seen: list[str] = []
    for folder in candidates:
        text = str(folder)
        if text not in seen:
            seen.append(text)
    where = ", ".join(seen) if seen else "(no folder to search: no tokenizer folder given)"
    return f"No {kind} tokenizer ({' + '.join(files)}) found; looked in: {where}."
