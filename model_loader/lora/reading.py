"""A LoRA file -> its adapters (from the safetensors header alone), then -> the transformer layers they change, with
every shape checked against the base model's config. Nothing here reads a weight: it is the cheap check that
runs before any model loads.

`read_lora(path)` groups the file's keys into adapters (module name, kind, the key of each tensor) and refuses
what is not a FLUX LoRA this engine applies: not a safetensors file (a pickle, a truncated download), a model
instead of a LoRA, a LoRA of another architecture, DoRA and other formats it does not implement.
`plan_lora(lora, config)` maps each adapter onto the Linear it changes (formats.py) and checks its shapes.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import FileKind, SafetensorsFile, first_keys, identify
from ..errors import ModelFileError
from ..flux.model import FluxConfig
from .formats import (
    ALL_SUFFIXES,
    ALPHA,
    DIFF_ROLES,
    LOHA_ROLES,
    LOKR_ROLES,
    LORA_PAIRS,
    OTHER_MODELS,
    REFUSED_SUFFIXES,
    TEXT_ENCODER_PREFIXES,
    Target,
    module_targets,
)

log = logging.getLogger(__name__)

KINDS = ("lora", "loha", "lokr", "diff")
_FLUX_BLOCK = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks|transformer_blocks)[._](\d+)[._]")
_SHOWN = 3  # problems listed in one message


@dataclass(frozen=True)
class Adapter:
    """One module of a LoRA file: its kind and the file key of each of its tensors, by role (up, down, alpha,
    w1_a, ..., diff, diff_b)."""
    name: str
    kind: str  # one of KINDS
    keys: Mapping[str, str]


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file's header, grouped: the adapters that may change the transformer, what is skipped."""
    path: Path
    file: SafetensorsFile
    adapters: tuple[Adapter, ...]
    text_encoder_keys: int  # tensors for CLIP/T5, which a model-only LoRA load skips (as LoraLoaderModelOnly)


@dataclass(frozen=True)
class PlannedAdapter:
    adapter: Adapter
    target: Target


@dataclass(frozen=True)
class LoraPlan:
    """Every adapter of a LoRA file with the layer rows it changes, shapes checked against one base config."""
    lora: LoraFile
    adapters: tuple[PlannedAdapter, ...]

    @property
    def layers(self) -> set[str]:
        return {p.target.layer for p in self.adapters}


def _damaged(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"{path}: {why}; the LoRA file is damaged or of a format this loader does not know.",
                          found=FileKind.LORA, expected=FileKind.LORA)


def _split(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of an adapter tensor's key, None for a key of no adapter."""
    for suffix in ALL_SUFFIXES:  # longest first: ".lora.up.weight" before ".up.weight"
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix
    return None


def _adapter(path: Path, name: str, found: dict[str, str]) -> Adapter | None:
    """The adapter of one module from its {suffix: key}; None when it holds only an alpha."""
    for suffix, what in REFUSED_SUFFIXES.items():
        if suffix in found:
            raise ModelFileError(f"{path} is {what} (e.g. {found[suffix]}), which the pack applies only inside "
                                 "ComfyUI (LoraLoaderModelOnly); outside it, use a plain LoRA, LoHa or LoKr.",
                                 found=FileKind.LORA, expected=FileKind.LORA)
    alpha = {"alpha": found[ALPHA]} if ALPHA in found else {}
    for up, down in LORA_PAIRS:
        if up in found or down in found:
            if not (up in found and down in found):
                have, missing = (up, down) if up in found else (down, up)
                raise _damaged(path, f"{found[have]} has no {name}{missing} beside it")
            return Adapter(name, "lora", {"up": found[up], "down": found[down], **alpha})
    for kind, roles in (("loha", LOHA_ROLES), ("lokr", LOKR_ROLES), ("diff", DIFF_ROLES)):
        keys = {role: found[suffix] for role, suffix in roles.items() if suffix in found}
        if not keys:
            continue
        complete = {"loha": len(keys) == 4,
                    "lokr": ("w1" in keys or {"w1_a", "w1_b"} <= set(keys))
                    and ("w2" in keys or {"w2_a", "w2_b"} <= set(keys)),
                    "diff": True}[kind]
        if not complete:
            raise _damaged(path, f"the {kind} tensors of {name} are incomplete (found {', '.join(sorted(keys))})")
        return Adapter(name, kind, {**keys, **alpha})
    return None


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """The adapters of a LoRA file, from its header alone. ModelFileError for a file that is no safetensors file,
    no LoRA, or a LoRA in a format this engine does not apply."""
    path = Path(path)
    file = SafetensorsFile(path)  # refuses pickles, truncated downloads and damaged headers by itself
    keys = file.keys()
    kind = identify(keys)
    if kind is not FileKind.LORA:
        found = "no tensors" if not keys else kind.description
        raise ModelFileError(f"{path} is {found}, not a LoRA. LoRA files hold pairs like `...lora_down.weight` / "
                             "`...lora_up.weight` (or lora_A / lora_B).", found=kind, expected=FileKind.LORA)
    grouped: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    text_encoder = 0
    for key in keys:
        if key.startswith(TEXT_ENCODER_PREFIXES):
            text_encoder += 1
            continue
        split = _split(key)
        if split is None:
            unknown.append(key)
        else:
            grouped.setdefault(split[0], {})[split[1]] = key
    adapters = []
    for name, found in grouped.items():
        adapter = _adapter(path, name, found)
        if adapter is not None:
            adapters.append(adapter)
        else:  # an alpha without weights
            unknown.extend(found.values())
    if unknown:
        log.warning("%s: %d tensors are not LoRA weights and are ignored (e.g. %s)", path, len(unknown),
                    ", ".join(sorted(unknown)[:_SHOWN]))
    if text_encoder:
        log.info("%s: %d text encoder tensors skipped (the LoRA changes the transformer only, as ComfyUI's "
                 "LoraLoaderModelOnly does)", path, text_encoder)
    return LoraFile(path, file, tuple(adapters), text_encoder)


def _no_transformer_layers(lora: LoraFile, unmapped: list[Adapter]) -> ModelFileError:
    names = [a.name for a in unmapped]
    for prefixes, what in OTHER_MODELS:
        if any(n.startswith(prefixes) or any(p in n for p in prefixes) for n in names):
            return ModelFileError(f"{lora.path} is {what}, not a FLUX.1 LoRA; it cannot change the FLUX.1 Krea "
                                  "transformer. Use a LoRA trained for FLUX.1 [dev] or Krea.", found=FileKind.LORA,
                                  expected=FileKind.LORA)
    if not names and lora.text_encoder_keys:
        return ModelFileError(f"{lora.path} changes only the text encoders; outside ComfyUI LoRAs change the "
                              "transformer only (as LoraLoaderModelOnly), so it would do nothing.")
    return ModelFileError(f"{lora.path} has no layer of the FLUX.1 transformer (its modules: "
                          f"{first_keys(names, _SHOWN)}); it is a LoRA of another model or of a naming this loader "
                          "does not know.", found=FileKind.LORA, expected=FileKind.LORA)


def _shape_problems(lora: LoraFile, planned: PlannedAdapter) -> list[str]:
    """What does not fit: the adapter's tensor shapes against the (rows, in) of the layer part it changes."""
    adapter, target = planned.adapter, planned.target
    shape = {role: lora.file.shape(key) for role, key in adapter.keys.items()}
    want = (target.rows, target.in_features)
    where = f"{adapter.name} ({adapter.kind}, for {target.layer}{_rows(target)})"
    problems = []
    if "alpha" in shape and _count(shape["alpha"]) != 1:
        problems.append(f"{where}: alpha has shape {shape['alpha']}, not a single number")
    if any(len(s) != 2 for role, s in shape.items() if role not in ("alpha", "diff_b")):
        return problems + [f"{where}: tensors of shapes {sorted(shape.items())} are not matrices (a LoRA of a "
                           "convolutional model?)"]
    if adapter.kind == "lora":
        (rows, rank_up), (rank, cols) = shape["up"], shape["down"]
        if rank_up != rank or (rows, cols) != want:
            problems.append(f"{where}: up {shape['up']} @ down {shape['down']} does not make the layer's {want}")
    elif adapter.kind == "loha":
        ok = shape["w1_a"][1] == shape["w1_b"][0] and shape["w2_a"][1] == shape["w2_b"][0] and \
            (shape["w1_a"][0], shape["w1_b"][1]) == want == (shape["w2_a"][0], shape["w2_b"][1])
        if not ok:
            problems.append(f"{where}: hada tensors {sorted(shape.items())} do not make the layer's {want}")
    elif adapter.kind == "lokr":
        factors = []
        for w in ("w1", "w2"):
            if w in shape:
                factors.append(shape[w])
            elif shape[f"{w}_a"][1] == shape[f"{w}_b"][0]:
                factors.append((shape[f"{w}_a"][0], shape[f"{w}_b"][1]))
            else:
                factors.append((0, 0))
        if (factors[0][0] * factors[1][0], factors[0][1] * factors[1][1]) != want:
            problems.append(f"{where}: the Kronecker product of {factors[0]} and {factors[1]} is not the "
                            f"layer's {want}")
    else:
        if "diff" in shape and shape["diff"] != want:
            problems.append(f"{where}: diff {shape['diff']} is not the layer's {want}")
        if "diff_b" in shape and shape["diff_b"] != (target.rows,):
            problems.append(f"{where}: diff_b {shape['diff_b']} is not the layer's bias ({target.rows},)")
    return problems


def _rows(target: Target) -> str:
    return f" rows {target.row_start}-{target.row_start + target.rows - 1}" if target.row_start or \
        target.swap_halves else ""


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_lora(lora: LoraFile, config: FluxConfig, targets: Mapping[str, Target] | None = None) -> LoraPlan:
    """Each adapter of `lora` with the layer rows it changes in a FLUX transformer of `config`; ModelFileError
    when the file does not fit that transformer (another architecture, more blocks, other widths).
    `targets`: module_targets(config), when the caller plans several files for one config."""
    targets = targets if targets is not None else module_targets(config)
    planned, unmapped = [], []
    for adapter in lora.adapters:
        target = targets.get(adapter.name)
        if target is None:
            unmapped.append(adapter)
        else:
            planned.append(PlannedAdapter(adapter, target))
    deeper = [a.name for a in unmapped if _FLUX_BLOCK.search(a.name + ".")]
    if deeper:
        raise ModelFileError(f"{lora.path} changes FLUX blocks this transformer does not have (e.g. "
                             f"{', '.join(deeper[:_SHOWN])}; the base has {config.depth} double and "
                             f"{config.depth_single_blocks} single blocks): it was made for another model.",
                             found=FileKind.LORA, expected=FileKind.LORA)
    if not planned:
        raise _no_transformer_layers(lora, unmapped)
    if unmapped:
        log.warning("%s: %d modules match no layer of the FLUX transformer and are ignored (e.g. %s)", lora.path,
                    len(unmapped), ", ".join(a.name for a in unmapped[:_SHOWN]))
    problems = [p for item in planned for p in _shape_problems(lora, item)]
    if problems:
        raise ModelFileError(f"{lora.path} does not fit this FLUX.1 transformer (hidden size {config.hidden_size}, "
                             f"{config.depth} double + {config.depth_single_blocks} single blocks): "
                             f"{len(problems)} shape problems, e.g. {'; '.join(problems[:_SHOWN])}. It is a LoRA for "
                             "another model or another FLUX variant.", found=FileKind.LORA, expected=FileKind.LORA)
    return LoraPlan(lora, tuple(planned))
