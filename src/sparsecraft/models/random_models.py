"""Random-weight models from built-in configs, for tests and for speed measurements at sizes
where no real weights are at hand (``random:llama-7b``).

Every random model comes with a byte-level tokenizer (256 byte tokens + 2 specials), so text
pipelines (calibration, perplexity, generation) run on it unchanged.
"""

from __future__ import annotations

import torch

# name -> (transformers config class name, kwargs). Tiny configs keep every architectural feature
# that matters to discovery and pruning (GQA, fused projections, Conv1D, parallel residual, sliding
# windows) at a size that runs in milliseconds.
_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

RANDOM_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(_TINY)),
    "tiny-mistral": ("MistralConfig", dict(_TINY)),
    "tiny-qwen2": ("Qwen2Config", dict(_TINY)),
    "tiny-gemma": ("GemmaConfig", dict(_TINY, head_dim=16)),
    "tiny-gemma2": ("Gemma2Config", dict(_TINY, head_dim=16, sliding_window=32,
                                         layer_types=["sliding_attention", "full_attention"])),
    "tiny-gemma3": ("Gemma3TextConfig", dict(_TINY, head_dim=16, sliding_window=32,
                                             layer_types=["sliding_attention", "full_attention"])),
    "tiny-phi3": ("Phi3Config", dict(_TINY)),
    "tiny-opt": ("OPTConfig", dict(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512,
                                   word_embed_proj_dim=64)),
    "tiny-gpt2": ("GPT2Config", dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "tiny-gpt-neox": ("GPTNeoXConfig", dict(vocab_size=320, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            max_position_embeddings=512, use_parallel_residual=True)),
    # Llama-3.2-1B shape.
    "llama-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                     max_position_embeddings=4096, tie_word_embeddings=True,
                                     rope_theta=500000.0)),
    # LLaMA-7B shape (the papers' reference model).
    "llama-7b": ("LlamaConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     max_position_embeddings=4096)),
}


def byte_tokenizer():
    """A 258-token byte-level BPE tokenizer (no merges) built in-process: no files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<|pad|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|pad|>", model_max_length=1 << 20,
    )


def build_config(name: str):
    import transformers

    cls_name, kwargs = RANDOM_CONFIGS[name]
    # Special ids of the byte tokenizer, valid for every vocab here.
    specials = dict(bos_token_id=256, eos_token_id=256, pad_token_id=257)
    return getattr(transformers, cls_name)(**{**kwargs, **specials})


def build_random(name: str, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
    """Instantiate ``random:NAME`` directly on ``device`` in ``dtype`` (no CPU fp32 detour)."""
    from transformers import AutoModelForCausalLM

    config = build_config(name)
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)
    model.generation_config.pad_token_id = config.pad_token_id
    return model, byte_tokenizer()
