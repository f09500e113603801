"""FLUX's two text encoders: CLIP-L and T5-XXL models, their tokenizers, loading, random weights."""
from .clip import CLIP_L, CLIPTextConfig, CLIPTextModel
from .loading import TextEncoders, clip_weights, load_clip_model, load_t5_model, load_text_encoders, t5_weights
from .random_weights import write_random_clip_checkpoint, write_random_t5_checkpoint
from .t5 import T5EncoderConfig, T5EncoderModel
from .tokenization import find_tokenizer_folders, load_clip_tokenizer, load_t5_tokenizer

__all__ = ["CLIP_L", "CLIPTextConfig", "CLIPTextModel", "T5EncoderConfig", "T5EncoderModel", "TextEncoders",
           "clip_weights", "find_tokenizer_folders", "load_clip_model", "load_clip_tokenizer", "load_t5_model",
           "load_t5_tokenizer", "load_text_encoders", "t5_weights", "write_random_clip_checkpoint",
           "write_random_t5_checkpoint"]
