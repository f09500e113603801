"""Files on disk -> ready torch modules. The public face the nodes, the command line and benchmarks import.

Never imports ComfyUI and names no ComfyUI folder or node input: a wrong file raises ModelFileError with
the kind it found (`found`) and the kind it needed (`expected`); the ComfyUI side words the folders.
"""
from .autoencoder import LATENT_CHANNELS, SCALE_FACTOR, SHIFT_FACTOR, AutoEncoder, load_autoencoder
from .checkpoints import FileKind, identify, open_checkpoint
from .errors import ModelFileError
from .flux import WEIGHT_DTYPES, FluxTransformer, load_flux
from .safety_checker import WHERE_TO_GET_IT, SafetyChecker, load_safety_checker
from .text_encoders import TextEncoders, load_text_encoders

__all__ = ["LATENT_CHANNELS", "SCALE_FACTOR", "SHIFT_FACTOR", "WEIGHT_DTYPES", "WHERE_TO_GET_IT", "AutoEncoder",
           "FileKind", "FluxTransformer", "ModelFileError", "SafetyChecker", "TextEncoders", "identify",
           "load_autoencoder", "load_flux", "load_safety_checker", "load_text_encoders", "open_checkpoint"]
