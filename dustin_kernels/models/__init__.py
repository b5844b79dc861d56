"""Llama and Qwen2 / Qwen2.5 decoders with a static KV cache, and Hugging Face checkpoint loading."""
from .config import ModelConfig
from .loading import DTYPES, load_config, load_model, load_tokenizer
from .transformer import KVCache, Transformer, causal_attention, init_random

__all__ = ["ModelConfig", "Transformer", "KVCache", "causal_attention", "init_random", "load_config",
           "load_model", "load_tokenizer", "DTYPES"]
