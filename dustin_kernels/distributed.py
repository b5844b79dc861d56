"""Tensor-parallel selection: the target's heads sharded across ranks, one selection for all of them.

Each rank holds `Hq / world` q heads and their KV heads, scores the retrieval heads it holds (none is
fine: `attention_scores(heads=[])` gives zeros), and one all-reduce sums the score rows, so every rank
passes the same rows to `select_tokens` and attends to the same blocks with its own heads.

    s = sharded_scores(q_shard, k_shard, seq_lens, retrieval_heads, group=tp_group)
    idx, count = select_tokens(s_draft, s, seq_lens, budget=512, m=128, window=T)   # same on every rank
    out_shard = sparse_verify(q_shard, k_shard, v_shard, seq_lens, idx, count)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import attention_scores


def local_heads(heads, rank: int, heads_per_rank: int) -> tuple[int, ...]:
    """The global q-head indices `heads` that rank `rank` holds, as its local indices."""
    first = rank * heads_per_rank
    return tuple(h - first for h in heads if first <= h < first + heads_per_rank)


def sharded_scores(q, k_cache, seq_lens, heads, *, group=None, block_size: int = 1, scale=None) -> torch.Tensor:
    """`attention_scores` of the unsharded model from this rank's shard: q [B, Hq / world, T, D], k_cache
    [B, Hkv / world, N_max, D]; heads: global q-head indices (the retrieval heads). float32[B, blocks],
    the same on every rank of `group` (one all-reduce)."""
    rank = dist.get_rank(group)
    scores = attention_scores(q, k_cache, seq_lens, heads=local_heads(heads, rank, q.shape[1]),
                              block_size=block_size, scale=scale)
    dist.all_reduce(scores, group=group)
    return scores
