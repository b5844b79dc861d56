"""Model hyper-parameters of the Llama and Qwen2 / Qwen2.5 decoder families, read from a Hugging Face
`config.json` (both the `rope_theta` + `rope_scaling` keys of older files and the `rope_parameters`
dict that transformers 5 writes)."""
from __future__ import annotations

import dataclasses
import math

import torch

FAMILIES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}; None: plain RoPE
    qkv_bias: bool = False  # Qwen2: always; Llama: `attention_bias`
    o_bias: bool = False  # Llama `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    eos_token_ids: tuple[int, ...] = ()
    family: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads: {self.num_kv_heads} must divide num_attention_heads "
                             f"{self.num_heads}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """From the dict of a Hugging Face `config.json` (model_type "llama" or "qwen2")."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"config.json: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if cfg.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported (full attention only)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        heads = cfg["num_attention_heads"]
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
            qkv_bias=family == "qwen2" or bias, o_bias=family == "llama" and bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096), eos_token_ids=eos, family=family)

    def inv_freq(self) -> torch.Tensor:
        """float32[head_dim / 2]: RoPE inverse frequencies, with linear or Llama-3 scaling when configured
        (the rule of transformers' `_compute_llama3_parameters`)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            return inv / scaling["factor"]
        if kind == "llama3":
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            return torch.where(medium, smoothed, scaled)
        return inv
