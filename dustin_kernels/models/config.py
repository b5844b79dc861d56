"""Model hyper-parameters of the Llama and Qwen2 / Qwen2.5 decoder families, read from a Hugging Face
`config.json` (both the `rope_theta` + `rope_scaling` keys of older files and the `rope_parameters`
dict that transformers 5 writes)."""
from __future__ import annotations

import dataclasses
import math

import torch

FAMILIES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED = object()


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_NUMBER = (_positive_number, "a positive number")
_ROPE_KEYS = {  # the keys each rope_type reads: (check, what it expects)
    "default": {},
    "linear": {"factor": _NUMBER},
    "llama3": {"factor": _NUMBER, "low_freq_factor": _NUMBER, "high_freq_factor": _NUMBER,
               "original_max_position_embeddings": (_positive_int, "a positive int")},
}


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even head dim (RoPE rotates pairs), got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_key_value_heads: {self.num_kv_heads} must divide num_attention_heads "
                             f"{self.num_heads}")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        """From the dict of a Hugging Face `config.json` (model_type "llama" or "qwen2"). A missing key,
        a value of the wrong type or out of range raises ValueError naming `source` and the key."""
        if not isinstance(cfg, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"{source}: model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
        if cfg.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")

        def get(key, ok=_positive_int, expected="a positive int", default=_REQUIRED, where=cfg, prefix=""):
            value = where.get(key)
            if value is None and default is not _REQUIRED:
                return default
            if value is None:
                raise ValueError(f"{source}: missing key '{prefix}{key}' ({expected})")
            if not ok(value):
                raise ValueError(f"{source}: key '{prefix}{key}': expected {expected}, got {repr(value)[:60]}")
            return value

        rope_key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
        rope = dict(get(rope_key, lambda v: isinstance(v, dict), "an object", {}))
        theta = rope.pop("rope_theta", cfg.get("rope_theta"))  # rope_parameters holds it in transformers 5
        theta = get("rope_theta", *_NUMBER, 10000.0, where={"rope_theta": theta})
        kind = rope.pop("rope_type", rope.pop("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"{source}: {rope_key}: rope_type {kind!r} is not supported "
                             f"(supported: {', '.join(ROPE_TYPES)})")
        for key in _ROPE_KEYS[kind]:
            get(key, *_ROPE_KEYS[kind][key], where=rope, prefix=f"{rope_key}.")
        if kind == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
            raise ValueError(f"{source}: {rope_key}: expected high_freq_factor > low_freq_factor, got {rope}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
        eos = get("eos_token_id", lambda v: _token_id(v) or isinstance(v, list) and all(map(_token_id, v)),
                  "a token id or a list of them", None)
        flags = {k: get(k, lambda v: isinstance(v, bool), "true or false", False)
                 for k in ("attention_bias", "mlp_bias", "tie_word_embeddings")}
        heads, hidden = get("num_attention_heads"), get("hidden_size")
        if cfg.get("head_dim") is None and hidden % heads:
            raise ValueError(f"{source}: key 'hidden_size': expected a multiple of num_attention_heads={heads} "
                             f"(there is no head_dim), got {hidden}")
        try:
            return cls(
                vocab_size=get("vocab_size"), hidden_size=hidden, intermediate_size=get("intermediate_size"),
                num_layers=get("num_hidden_layers"), num_heads=heads,
                num_kv_heads=get("num_key_value_heads", default=heads),
                head_dim=get("head_dim", default=hidden // heads),
                rms_norm_eps=float(get("rms_norm_eps", *_NUMBER, 1e-6)), rope_theta=float(theta),
                rope_scaling=None if kind == "default" else {"rope_type": kind, **rope},
                qkv_bias=family == "qwen2" or flags["attention_bias"],
                o_bias=family == "llama" and flags["attention_bias"], mlp_bias=flags["mlp_bias"],
                tie_word_embeddings=flags["tie_word_embeddings"],
                max_position_embeddings=get("max_position_embeddings", default=4096),
                eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,), family=family)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

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
