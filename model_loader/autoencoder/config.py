"""The shape of FLUX's autoencoder and the facts of its latent space (channels, scale, shift)."""
from __future__ import annotations

from dataclasses import dataclass

LATENT_CHANNELS = 16  # FLUX latents: 16 channels at 1/8 of the image's size
# The latent normalisation of FLUX's VAE: the transformer sees (z - SHIFT_FACTOR) * SCALE_FACTOR.
SHIFT_FACTOR = 0.1159
SCALE_FACTOR = 0.3611


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Shape of the autoencoder; every field is read off a checkpoint's tensor shapes except `norm_groups`."""
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = LATENT_CHANNELS
    mid_attention: bool = True
    norm_groups: int = 32  # not stored in any file: 32 in FLUX (and every LDM-family VAE)

    @property
    def downscale_factor(self) -> int:
        """Image pixels per latent pixel along a side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)


FLUX_AUTOENCODER = AutoEncoderConfig()
