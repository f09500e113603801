"""The FLUX.1 [dev] sampling schedule (BFL reference): resolution-dependent shift of a linear time grid.

t runs from 1 (pure noise) to 0 (clean latent). The shift `mu` grows linearly with the image token count,
so larger images spend more of their steps at high noise levels.
"""
from __future__ import annotations

import math

BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def shift_mu(image_seq_len: int) -> float:
    """mu, linear in the image token count: 0.5 at 256 tokens, 1.15 at 4096 (extrapolated beyond)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)


def time_shift(mu: float, t: float) -> float:
    """t' = e^mu / (e^mu + (1/t - 1)); exact at the ends (t = 0 -> 0, t = 1 -> 1)."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 to 0, shifted for the image size (float64 arithmetic)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}.")
    mu = shift_mu(image_seq_len)
    return [time_shift(mu, 1.0 - i / num_steps) for i in range(num_steps + 1)]


def image_to_image_start(num_steps: int, strength: float) -> int:
    """Index of the first step run for image-to-image, as diffusers' FluxImg2ImgPipeline computes it.

    Of the num_steps-long schedule, the steps from `start` on run: num_steps - int(num_steps - num_steps * strength)
    of them (= int(num_steps * strength) whenever that product is exact; one more when float rounding leaves it
    just below an integer, exactly as the reference pipeline does). At least one step always runs.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}.")
    init_steps = min(num_steps * strength, num_steps)
    return int(max(num_steps - init_steps, 0))
