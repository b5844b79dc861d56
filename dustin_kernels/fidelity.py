"""Fidelity of sparse verification against dense verification, measured inside a generation.

With `generate(..., fidelity=True)` every step whose policy selects a history (not the dense policy)
also runs, on the same inputs:
- in every target layer (`Probe.attend` wraps the layer's sparse attention and returns its output
  unchanged): dense attention of the window queries; per (active sequence, q head, window row):
    mass kept     the dense attention mass on the keys the sparse pass read, exp(lse_sparse - lse_dense)
                  (those keys are a subset of all keys);
    top-k recall  mass kept / the mass of as many keys taken by largest dense weight (1: as good as
                  that row's own top-k, the best any selection of that size can do);
    output error  |o_sparse - o_dense| / |o_dense| (L2 over the head dim);
- the target once more with dense verification (before the sparse pass, which then writes the
  window's K/V as an unprobed step would): greedy agreement is the share of window positions of
  active sequences whose argmax token is the same in both passes.
The generated tokens are those of an unprobed run; the dense work makes a probed run slower, so its
tokens/s are not speed figures.
"""
from __future__ import annotations

import dataclasses

import torch

from . import dense_verify


@dataclasses.dataclass
class LayerFidelity:
    """Sums over the rows (sequence, q head, window row) seen in one target layer."""
    rows: int = 0
    mass_kept: float = 0.0
    min_mass_kept: float = 1.0
    topk_recall: float = 0.0
    output_error: float = 0.0
    max_output_error: float = 0.0

    def add(self, kept: torch.Tensor, recall: torch.Tensor, error: torch.Tensor) -> None:
        """kept, recall, error: float [rows] of one call."""
        if kept.numel():
            self.merge(LayerFidelity(kept.numel(), float(kept.sum()), float(kept.min()), float(recall.sum()),
                                     float(error.sum()), float(error.max())))

    def merge(self, other: "LayerFidelity") -> None:
        self.rows += other.rows
        self.mass_kept += other.mass_kept
        self.min_mass_kept = min(self.min_mass_kept, other.min_mass_kept)
        self.topk_recall += other.topk_recall
        self.output_error += other.output_error
        self.max_output_error = max(self.max_output_error, other.max_output_error)

    def summary(self) -> dict:
        """Means over the rows (min / max where named)."""
        n = max(self.rows, 1)
        return {"rows": self.rows, "mass_kept": self.mass_kept / n, "min_mass_kept": self.min_mass_kept,
                "topk_recall": self.topk_recall / n, "output_error": self.output_error / n,
                "max_output_error": self.max_output_error}


class Probe:
    """Accumulates the fidelity of a run; `speculative_step` calls `begin` once per probed step, then
    the target's layers call `attend` in order."""

    def __init__(self):
        self.layers: list[LayerFidelity] = []
        self.positions = 0  # window positions compared (active sequences)
        self.agreeing = 0  # of which the sparse and dense passes' argmax tokens agree
        self._step = None  # (the step's `policies.StepAttention`, active bool[B])
        self._layer = 0

    def begin(self, attention, active: torch.Tensor) -> None:
        """attention: the step's `policies.StepAttention` (its `read` gives each layer's history tokens)."""
        self._step, self._layer = (attention, active), 0

    def attend(self, q, k_cache, v_cache, seq_lens):
        """The step's sparse attention, recording its fidelity against dense attention on these inputs."""
        attention, active = self._step
        out, lse = attention(q, k_cache, v_cache, seq_lens, return_lse=True)
        history = attention.read[-1]
        dense_out, dense_lse = dense_verify(q, k_cache, v_cache, seq_lens, return_lse=True)
        if self._layer == len(self.layers):
            self.layers.append(LayerFidelity())
        rows = active.nonzero()[:, 0]
        kept = (lse.float() - dense_lse.float()).exp()[rows]  # [b, Hq, T]
        best = torch.stack([topk_mass(q[b], k_cache[b], int(seq_lens[b]), int(history[b])) for b in rows.tolist()]) \
            if len(rows) else kept
        error = (out.float() - dense_out.float()).norm(dim=-1) / dense_out.float().norm(dim=-1).clamp(min=1e-30)
        self.layers[self._layer].add(kept.flatten(), (kept / best).flatten(), error[rows].flatten())
        self._layer += 1
        return out

    def compare_tokens(self, sparse_logits, dense_logits, active: torch.Tensor) -> None:
        """Greedy agreement of the two passes' logits [B, T, V] at the window positions of active sequences."""
        same = sparse_logits.argmax(-1) == dense_logits.argmax(-1)  # [B, T]
        self.agreeing += int(same[active].sum())
        self.positions += int(active.sum()) * same.shape[1]

    def summary(self) -> dict | None:
        """Means over all probed rows (and per target layer), or None when no step was probed."""
        if not self.layers:
            return None
        total = LayerFidelity()
        for layer in self.layers:
            total.merge(layer)
        return {**total.summary(), "greedy_agreement": self.agreeing / max(self.positions, 1),
                "positions": self.positions, "per_layer": [layer.summary() for layer in self.layers]}


def topk_mass(q, k, seq_len: int, history: int) -> torch.Tensor:
    """float32 [Hq, T]: the dense attention mass of each window row's `history + t + 1` keys of largest
    weight (row t sees keys [0, seq_len - T + t]; the default scale 1/sqrt(D)). One sequence: q [Hq, T, D],
    k [Hkv, N_max, D]; its weights [Hq, T, seq_len] in fp32 are the largest tensor made (K is not repeated
    per q head)."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    t = torch.arange(T, device=q.device)
    logits = q.float().reshape(Hkv, Hq // Hkv * T, D) @ k[:, :seq_len].float().transpose(1, 2) * D ** -0.5
    visible = torch.arange(seq_len, device=q.device) <= (seq_len - T + t)[:, None]  # [T, n]
    probs = logits.reshape(Hq, T, seq_len).masked_fill(~visible, float("-inf")).softmax(-1)
    cumulative = probs.sort(-1, descending=True).values.cumsum(-1)
    count = (history + t + 1).clamp(max=seq_len)  # [T]
    return cumulative.gather(-1, (count - 1)[None, :, None].expand(Hq, T, 1))[..., 0]
