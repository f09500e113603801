"""LoRA files -> changes to the pack's FLUX transformer, outside ComfyUI (inside it, ComfyUI's own LoRA code applies
them to the MODEL the pack hands it).

    check:  read_lora(path) -> LoraFile (header only), plan_lora(lora, config) -> LoraPlan (shapes checked)
    apply:  set_loras(transformer, [LoraChoice(path, strength), ...]) merges exactly that set (restoring the base
            weights of the previous one first); restore_base(transformer) takes it out
    factors: layer_deltas(plan_loras(choices, config)) -> {layer: [LayerDelta]}, each low rank as (up, down,
            scale) where the file is; set_loras runs them beside the matmul of GGUF layers (beside.py
            LowRankAdapter), which cannot merge

Formats: kohya sd-scripts, diffusers/peft, ComfyUI, OneTrainer, SimpleTuner LyCORIS and XLabs names (formats.py);
LoRA, LoHa, LoKr and full-difference adapters (deltas.py).
"""
from .applying import LoraChoice, applied_loras, layer_deltas, plan_loras, restore_base, set_key, set_loras
from .deltas import LayerDelta, lora_deltas
from .formats import Target, linear_shapes, module_targets
from .reading import Adapter, LoraFile, LoraPlan, plan_lora, read_lora

__all__ = ["Adapter", "LayerDelta", "LoraChoice", "LoraFile", "LoraPlan", "Target", "applied_loras", "layer_deltas",
           "linear_shapes", "lora_deltas", "module_targets", "plan_lora", "plan_loras", "read_lora", "restore_base",
           "set_key", "set_loras"]
