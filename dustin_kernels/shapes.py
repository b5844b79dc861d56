"""Attention shapes of the model presets shared by the benchmark, the tuner and the AOT check."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    q_heads: int
    kv_heads: int
    head_dim: int
    layers: int = 1  # decoder layers (a verification step runs sparse attention once per layer)

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads


def spread_heads(q_heads: int, n: int = 4) -> tuple[int, ...]:
    """n distinct q-heads spread evenly over q_heads: stand-ins for calibrated retrieval heads."""
    n = min(n, q_heads)
    return tuple(i * q_heads // n for i in range(n))


PRESETS = {
    "qwen2.5-72b": AttentionShape(64, 8, 128, 80),
    "qwen2.5-7b": AttentionShape(28, 4, 128, 28),
    "llama-3.1-8b": AttentionShape(32, 8, 128, 32),
    "qwen2.5-0.5b": AttentionShape(14, 2, 64, 24),  # the draft of the paper's pair
    "cpu-small": AttentionShape(8, 2, 64, 4),
}
