"""The FLUX.1 transformer: model, key layouts, loading, random weights."""
from .layouts import LAYOUTS
from .loading import WEIGHT_DTYPES, config_from_checkpoint, load_flux, load_flux_from_source
from .model import FLUX_DEV, FluxConfig, FluxTransformer, variant_problem
from .random_weights import RandomFluxSource, write_random_flux_checkpoint

__all__ = ["FLUX_DEV", "LAYOUTS", "WEIGHT_DTYPES", "FluxConfig", "FluxTransformer", "RandomFluxSource",
           "config_from_checkpoint", "load_flux", "load_flux_from_source", "variant_problem",
           "write_random_flux_checkpoint"]
