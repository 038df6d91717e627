"""Model code: the decoder, rotary embeddings, checkpoint folders, HF interop."""

from sapwood.model.folder import build_model, load, save_folder
from sapwood.model.transformer import Decoder

__all__ = ["Decoder", "build_model", "load", "save_folder"]
