"""Float64 references of the three ops, written literally from their contract (README, "The ops").

The oracle for tests, benchmarks and the tuner's correctness check. Slow on purpose (Python loops
over sequences, heads and rows); never imported by the fast paths. Inputs are CPU or CUDA tensors;
results are float64 CPU tensors (idx/count int64).
"""
from __future__ import annotations

import math

import torch


def _lengths(seq_lens) -> list[int]:
    return [int(x) for x in seq_lens.tolist()]


def attention_scores(q, k_cache, seq_lens, heads=None, block_size=1, scale=None):
    """float64[B, ceil(N_max / block_size)]: causal softmax mass per key block, summed over heads and rows."""
    B, Hq, T, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    heads = range(Hq) if heads is None else heads
    out = torch.zeros(B, math.ceil(N / block_size), dtype=torch.float64)
    for b, L in enumerate(_lengths(seq_lens)):
        for h in heads:
            keys = k_cache[b, h // G].double().cpu()
            for t in range(T):
                p = L - T + t  # position of window query t; it sees keys [0, p]
                logits = keys[: p + 1] @ q[b, h, t].double().cpu() * scale
                prob = torch.softmax(logits, dim=0)
                out[b].index_add_(0, torch.arange(p + 1) // block_size, prob)  # key j adds to block j // bs
    return out


def select_tokens(s_draft, s_target, seq_lens, budget, m, sink=4, recent=16, window=1, block_size=1):
    """(idx int64[B, budget] ascending, -1 padded; count int64[B]) by Dustin's rule, in blocks."""
    B = seq_lens.shape[0]
    idx = torch.full((B, budget), -1, dtype=torch.int64)
    count = torch.zeros(B, dtype=torch.int64)
    for b, L in enumerate(_lengths(seq_lens)):
        n = math.ceil((L - window) / block_size)  # history blocks
        if n <= budget:
            chosen = set(range(n))
        else:
            chosen = set(range(sink)) | set(range(n - recent, n))
            free = budget - len(chosen)
            n_draft = 0 if s_draft is None else (free if s_target is None else min(m, free))
            for signal, quota in ((s_draft, n_draft), (s_target, free - n_draft)):
                if quota == 0:
                    continue
                rest = [j for j in range(n) if j not in chosen]
                # highest score first; ties go to the lower block
                rest.sort(key=lambda j: (-float(signal[b, j]), j))
                chosen |= set(rest[:quota])
        picked = sorted(chosen)
        idx[b, : len(picked)] = torch.tensor(picked, dtype=torch.int64)
        count[b] = len(picked)
    return idx, count


def sparse_verify(q, k_cache, v_cache, seq_lens, idx, count, block_size=1, scale=None):
    """float64[B, Hq, T, D]: window queries over the selected history blocks plus the causal window."""
    B, Hq, T, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b, L in enumerate(_lengths(seq_lens)):
        ctx = L - T
        history = sorted(
            pos
            for blk in idx[b, : int(count[b])].tolist()
            for pos in range(blk * block_size, (blk + 1) * block_size)
            if pos < ctx
        )
        for h in range(Hq):
            keys, values = k_cache[b, h // G].double().cpu(), v_cache[b, h // G].double().cpu()
            for t in range(T):
                positions = torch.tensor(history + list(range(ctx, ctx + t + 1)), dtype=torch.int64)
                logits = keys[positions] @ q[b, h, t].double().cpu() * scale
                out[b, h, t] = torch.softmax(logits, dim=0) @ values[positions]
    return out


def dense_attention(q, k_cache, v_cache, seq_lens, scale=None):
    """float64[B, Hq, T, D]: plain causal attention of the window over the whole valid cache."""
    B, Hq, T, D = q.shape
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    G = Hq // k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    for b, L in enumerate(_lengths(seq_lens)):
        for h in range(Hq):
            keys, values = k_cache[b, h // G].double().cpu(), v_cache[b, h // G].double().cpu()
            for t in range(T):
                p = L - T + t
                prob = torch.softmax(keys[: p + 1] @ q[b, h, t].double().cpu() * scale, dim=0)
                out[b, h, t] = prob @ values[: p + 1]
    return out


def attention_lse(q, k_cache, seq_lens, scale=None):
    """float64[B, Hq, T]: natural-log log-sum-exp of each window row's scaled scores over its keys [0, p_t]
    (the lse that `attention_scores(..., lse=)` takes)."""
    B, Hq, T, D = q.shape
    G = Hq // k_cache.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, T, dtype=torch.float64)
    for b, L in enumerate(_lengths(seq_lens)):
        for h in range(Hq):
            keys = k_cache[b, h // G].double().cpu()
            for t in range(T):
                p = L - T + t
                out[b, h, t] = torch.logsumexp(keys[: p + 1] @ q[b, h, t].double().cpu() * scale, dim=0)
    return out
