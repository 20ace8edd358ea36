"""Model loading, saving and generic discovery of decoder blocks and prunable linears."""

from .discovery import (
    block_linears,
    decoder_blocks,
    is_linear,
    layer_shape,
    prunable_linears,
    set_weight_matrix,
    weight_matrix,
)
from .loading import alias_gguf_path, load, parse_dtype, save
from .random_models import RANDOM_CONFIGS, build_random, byte_tokenizer

__all__ = [
    "RANDOM_CONFIGS", "alias_gguf_path", "block_linears", "build_random", "byte_tokenizer",
    "decoder_blocks", "is_linear", "layer_shape", "load", "parse_dtype", "prunable_linears", "save",
    "set_weight_matrix", "weight_matrix",
]
