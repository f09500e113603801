"""Bytes on disk (safetensors, GGUF) -> named lazy tensors, knowing no model: read, resolve, identify, write."""
from .gguf_file import GGUFFile
from .identify import FileKind, first_keys, identify, is_lora
from .reader import Checkpoint, RenamedSource, SafetensorsFile, StateDictSource, TensorSource, file_identity
from .resolver import open_checkpoint
from .writer import Entry, save_tensors, write_safetensors

__all__ = ["Checkpoint", "Entry", "GGUFFile", "RenamedSource", "FileKind", "SafetensorsFile", "StateDictSource",
           "TensorSource", "file_identity", "first_keys", "identify", "is_lora", "open_checkpoint", "save_tensors",
           "write_safetensors"]
