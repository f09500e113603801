"""Step caching for `acceleration` (first-block cache, of the TeaCache family).

At every step the first double block runs. Its change to the image tokens (the first-block residual) is
compared with the one of the last fully computed step; when the relative L1 difference is below the
threshold, the rest of the blocks are skipped and the residual they added at that last full step is
reused. The first and the last step always run fully. One `StepCache` serves exactly one run: it is
created by `generate` and dropped with it, so nothing carries over between runs, prompts or sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Relative L1 change of the first-block residual below which a step reuses the cached residual.
THRESHOLDS: dict[str, float] = {"none": 0.0, "regular": 0.06, "high": 0.15}


def cache_bytes(batch: int, image_tokens: int, hidden: int) -> int:
    """The most one run's cache holds: the first-block and the rest residuals, (B, L, hidden) each, in at most
    4 bytes an element (what the sampler asks memory for beside the transformer's own)."""
    return 2 * batch * image_tokens * hidden * 4


def l1_change_sums(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(sum |current - previous|, sum |previous|) in float64: the relative L1 change is their ratio. Sums, not
    means, so that partial sums over token shards add up (a sequence-parallel model all-reduces them)."""
    previous = previous.float()
    dtype = torch.float32 if previous.device.type == "mps" else torch.float64  # MPS has no float64
    return torch.stack((torch.sum((current.float() - previous).abs(), dtype=dtype),
                        torch.sum(previous.abs(), dtype=dtype)))


@dataclass
class CacheReport:
    full_steps: int = 0
    reused_steps: int = 0
    reused_at: list[int] = field(default_factory=list)

    def summary(self) -> str:
        total = self.full_steps + self.reused_steps
        return f"{self.full_steps} of {total} steps computed fully, {self.reused_steps} reused"


class StepCache:
    """Wraps a Flux model for one run of `total_steps` model calls (one per step)."""

    def __init__(self, model: torch.nn.Module, threshold: float, total_steps: int) -> None:
        self.model = model
        self.threshold = threshold
        self.total_steps = total_steps
        self.step = 0
        self.report = CacheReport()
        # The model may sum over its own tokens (a sequence-parallel one sums over every rank's): the split
        # forward's optional `l1_change_sums`.
        self._change_sums = getattr(model, "l1_change_sums", l1_change_sums)
        self._first_residual: torch.Tensor | None = None  # (B, L, hidden) at the last full step
        self._rest_residual: torch.Tensor | None = None   # (B, L, hidden) what blocks 2.. added then

    def _can_reuse(self, first_residual: torch.Tensor) -> bool:
        if self.threshold <= 0 or self._first_residual is None:
            return False
        if self.step == 0 or self.step >= self.total_steps - 1:
            return False
        if self._first_residual.shape != first_residual.shape:
            return False
        changed, before = self._change_sums(first_residual, self._first_residual).tolist()
        return changed / max(before, 1e-12) < self.threshold

    def forward_orig(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                     timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The transformer's reference call (same arguments), running the blocks only when they must run."""
        model = self.model
        img, txt, vec, pe = model.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        first = model.double_blocks[0]
        img_in = img
        img, txt = first(img=img, txt=txt, vec=vec, pe=pe)
        first_residual = img - img_in
        if self._can_reuse(first_residual):
            img = img + self._rest_residual
            self.report.reused_steps += 1
            self.report.reused_at.append(self.step)
        else:
            img_first = img
            img = model.run_blocks(img, txt, vec, pe, first_double_block=1)
            self._rest_residual = img - img_first
            self._first_residual = first_residual
            self.report.full_steps += 1
        self.step += 1
        return model.final(img, vec)
