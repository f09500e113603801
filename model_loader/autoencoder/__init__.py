"""FLUX's 16-channel autoencoder (the VAE): model, tiling, key layouts, loading, random weights."""
from .config import FLUX_AUTOENCODER, LATENT_CHANNELS, SCALE_FACTOR, SHIFT_FACTOR, AutoEncoderConfig
from .loading import autoencoder_weights, load_autoencoder
from .model import AutoEncoder
from .random_weights import build_random_autoencoder, diffusers_config, write_random_autoencoder_checkpoint

__all__ = ["FLUX_AUTOENCODER", "LATENT_CHANNELS", "SCALE_FACTOR", "SHIFT_FACTOR", "AutoEncoder", "AutoEncoderConfig",
           "autoencoder_weights", "build_random_autoencoder", "diffusers_config", "load_autoencoder",
           "write_random_autoencoder_checkpoint"]
