"""A compact Llama / Qwen2 decoder over a static KV cache written by position.

The cache of each layer is `[B, Hkv, N_max, D]`; which entries are valid is the caller's business:
`lens: int[B]` (tokens already in the cache per sequence). A forward pass over a window `tokens [B, T]`
puts token t of sequence b at position `lens[b] + t`, writes its K/V there, then calls
`attend(q, k_cache, v_cache, seq_lens)` with `seq_lens = lens + T`: the contract of the ops (README, "The
ops"), so `dense_verify`, a policy's per-step attention (`policies.StepAttention`) or `causal_attention`
(prefill chunks) plug in unchanged. Rolling back is setting `lens` back: entries
past it are never read. `capture` names layers whose post-RoPE queries the pass returns (the
retrieval heads' scores of the Dustin policy are computed from them).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..ops.verify import dense_verify
from .config import ModelConfig

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class KVCache:
    """Per-layer K and V, each `[B, Hkv, N_max, D]`."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V of one token over every layer."""
        return sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k in self.k)


def causal_attention(q, k_cache, v_cache, seq_lens):
    """Dense causal attention with the ops' contract for long windows (prefill chunks): query t of
    sequence b sits at `seq_lens[b] - T + t` and sees keys `[0, p_t]`. torch SDPA: where every window
    starts at position 0, plain causal attention over GQA heads (`is_causal`, `enable_gqa`: FlashAttention
    on CUDA in fp16 / bf16, no mask, K/V not repeated); else an explicit mask, the queries of a KV head
    stacked as G*T rows so K/V are never repeated per q head."""
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    n = int(seq_lens.max())
    if n == T and int(seq_lens.min()) == T:
        return F.scaled_dot_product_attention(q, k_cache[:, :, :T], v_cache[:, :, :T], is_causal=True,
                                              enable_gqa=G > 1)
    pos = seq_lens.long()[:, None] - T + torch.arange(T, device=q.device)  # [B, T]
    mask = torch.arange(n, device=q.device) <= pos[..., None]  # [B, T, n]
    mask = mask[:, None, None].expand(B, 1, G, T, n).reshape(B, 1, G * T, n)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, G * T, D), k_cache[:, :, :n], v_cache[:, :, :n],
                                         attn_mask=mask)
    return out.reshape(B, Hq, T, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate(x, cos, sin):
    """RoPE in the rotate-half layout of Llama / Qwen2; cos, sin: [B, 1, T, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, k_cache, v_cache, pos, seq_lens, attend: Attend):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        batch = torch.arange(B, device=x.device)[:, None]
        k_cache[batch, :, pos] = k.transpose(1, 2)  # [B, T, Hkv, D] at positions pos [B, T]
        v_cache[batch, :, pos] = v.transpose(1, 2)
        out = attend(q, k_cache, v_cache, seq_lens)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), q


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, pos, seq_lens, attend):
        h, q = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, pos, seq_lens, attend)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), q


class Transformer(nn.Module):
    """Llama / Qwen2 decoder; parameter names are those of Hugging Face checkpoints without `model.`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.requires_grad_(False)  # inference only
        self._inv_freq = config.inv_freq()  # float32, kept out of .to(dtype)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        shape = (batch, c.num_kv_heads, max_len, c.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        return KVCache([torch.zeros(shape, **kw) for _ in self.layers], [torch.zeros(shape, **kw) for _ in self.layers])

    def forward(self, tokens, cache: KVCache, lens, *, attend: Attend = dense_verify,
                capture: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """tokens int64[B, T] at positions `lens[b] + t` (lens int[B]: valid cache entries before the
        window). Returns (final-normed hidden states [B, T, hidden], {layer: queries [B, Hq, T, D]} for
        the layers in `capture`)."""
        B, T = tokens.shape
        pos = lens.long()[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        seq_lens = (lens.long() + T).to(torch.int32)
        if self._inv_freq.device != tokens.device:
            self._inv_freq = self._inv_freq.to(tokens.device)
        freqs = pos.float()[..., None] * self._inv_freq  # as transformers: fp32 angles
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        capture = set(capture)
        queries = {}
        x = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x, q = layer(x, cos, sin, cache.k[i], cache.v[i], pos, seq_lens, attend)
            if i in capture:
                queries[i] = q
        return self.norm(x), queries

    def logits(self, hidden) -> torch.Tensor:
        """float32 logits of final-normed hidden states [..., hidden]."""
        return self.lm_head(hidden).float()

    def prefill(self, tokens, lengths, cache: KVCache, *, chunk: int | None = None,
                capture: Iterable[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Write the prompts `tokens [B, L]` (right-padded; `lengths int[B]` real tokens, may be 0) to
        positions [0, L) of an empty cache, `chunk` positions per pass (default: one pass on CUDA in
        fp16 / bf16 where a fused SDPA kernel (FlashAttention, cuDNN) takes it, memory linear in L;
        else 512: attention memory chunk x L, never L x L). Padding is written past a sequence's length,
        where nothing reads it. Returns (hidden state of each sequence's last real token [B, hidden]
        (zeros where length 0), {layer: its query [B, Hq, 1, D]} for `capture`)."""
        B, L = tokens.shape
        if chunk is None:
            if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
                try:
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):  # never the L x L math
                        return self.prefill(tokens, lengths, cache, chunk=max(L, 1), capture=capture)
                except RuntimeError:  # no fused kernel for this shape (or out of memory): chunks it is
                    pass
            chunk = 512
        lengths = lengths.long()
        capture = tuple(capture)
        last = torch.zeros(B, self.config.hidden_size, dtype=self.dtype, device=self.device)
        q_last = {i: torch.zeros(B, self.config.num_heads, 1, self.config.head_dim, dtype=self.dtype,
                                 device=self.device) for i in capture}
        batch = torch.arange(B, device=tokens.device)
        for c0 in range(0, L, chunk):
            part = tokens[:, c0:c0 + chunk]
            lens = torch.full((B,), c0, dtype=torch.int32, device=tokens.device)
            hidden, queries = self(part, cache, lens, attend=causal_attention, capture=capture)
            row = lengths - 1 - c0
            here = (row >= 0) & (row < part.shape[1])
            row = row.clamp(0, part.shape[1] - 1)
            last = torch.where(here[:, None], hidden[batch, row], last)
            for i in capture:
                q_last[i] = torch.where(here[:, None, None, None], queries[i][batch, :, row][:, :, None], q_last[i])
        return last, q_last


def init_random(model: Transformer, seed: int, std: float = 0.02) -> Transformer:
    """Random weights as transformers initialises them (normal(0, std), zero biases, unit norms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
