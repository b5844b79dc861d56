"""The ops in a serving engine's layout: ragged query rows and a paged cache.

- `sparse_verify_varlen`: q `[num_tokens, Hq, D]`, request b's rows at `query_start_loc[b] :
  query_start_loc[b + 1]` (T may differ per request), pages `[num_pages, Hkv, page_size, D]` ("HND") or
  `[num_pages, page_size, Hkv, D]` ("NHD"), `block_table int32[B, max_pages]`. The requests are grouped
  by T, and each group is one `sparse_verify_paged` call (both backends; one call when every request
  verifies the same T, as in vLLM's and SGLang's speculative decoding).
- `attention_scores_paged`: `attention_scores` over the same paged cache, the pages a request uses
  gathered into a `[B, Hkv, pages * page_size, D]` copy first (no paged scoring kernel yet: on a GPU
  this reads the used K twice; the copy covers only the pages up to the longest request).
"""
from __future__ import annotations

import torch

from .. import _checks
from .scores import attention_scores
from .verify import sparse_verify_paged

LAYOUTS = ("HND", "NHD")


def _pages(k_pages, layout: str, name: str) -> torch.Tensor:
    """k_pages as [num_pages, Hkv, page_size, D] (a view)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'HND' or 'NHD', got {layout!r}")
    shape_doc = "[num_pages, Hkv, page_size, D]" if layout == "HND" else "[num_pages, page_size, Hkv, D]"
    _checks.check_tensor(name, k_pages, 4, shape_doc=shape_doc)
    return k_pages if layout == "HND" else k_pages.transpose(1, 2)


def _rows_per_request(query_start_loc, num_tokens: int, batch: int) -> list[int]:
    _checks.check_tensor("query_start_loc", query_start_loc, 1, (torch.int32, torch.int64), "int32[B + 1]")
    if query_start_loc.shape[0] != batch + 1:
        raise ValueError(f"query_start_loc: expected shape [B + 1 = {batch + 1}], got {tuple(query_start_loc.shape)}")
    starts = query_start_loc.tolist()
    rows = [b - a for a, b in zip(starts, starts[1:])]
    if starts[0] != 0 or starts[-1] != num_tokens or min(rows, default=1) < 1:
        raise ValueError(f"query_start_loc: expected 0 = start_0 < start_1 < ... < start_B = num_tokens = {num_tokens}, "
                         f"got {starts}")
    return rows


def sparse_verify_varlen(q, k_pages, v_pages, block_table, seq_lens, query_start_loc, idx, count, *, block_size=1,
                         scale=None, layout="HND", out=None, backend=None):
    """`sparse_verify` in the engine layout (module docstring): q [num_tokens, Hq, D]; seq_lens int32[B]
    counts each request's tokens including its query rows; idx / count as `select_tokens` returns them
    for those lengths and each request's T. Returns [num_tokens, Hq, D] in q's dtype (into `out` when
    given). Reads query_start_loc on the host once (engines keep a host copy of it)."""
    _checks.check_tensor("q", q, 3, shape_doc="[num_tokens, Hq, D]")
    k, v = _pages(k_pages, layout, "k_pages"), _pages(v_pages, layout, "v_pages")
    _checks.check_tensor("block_table", block_table, 2, (torch.int32,), "int32[B, max_pages]")
    rows = _rows_per_request(query_start_loc, q.shape[0], block_table.shape[0])
    out = _checks.check_out(out, q.shape, q.dtype, q.device)
    starts = query_start_loc[:-1].to(q.device, torch.long)
    for T in sorted(set(rows)):
        group = torch.tensor([b for b, r in enumerate(rows) if r == T], device=q.device)
        token = (starts[group, None] + torch.arange(T, device=q.device)).flatten()  # [len(group) * T]
        qg = q[token].view(len(group), T, *q.shape[1:]).transpose(1, 2)  # [Bg, Hq, T, D]
        o = sparse_verify_paged(qg, k, v, block_table[group], seq_lens[group], idx[group], count[group],
                                block_size=block_size, scale=scale, backend=backend)
        out[token] = o.transpose(1, 2).reshape(-1, *q.shape[1:])
    return out


def attention_scores_paged(q, k_pages, block_table, seq_lens, *, heads=None, block_size=1, scale=None, layout="HND",
                           backend=None):
    """`attention_scores` (q [B, Hq, T, D], window rows of every request) over a paged cache: k_pages as
    in `sparse_verify_varlen`, block_table int32[B, max_pages]. float32[B, ceil(max_pages * page_size /
    block_size)], zero past seq_lens."""
    k = _pages(k_pages, layout, "k_pages")
    _checks.check_tensor("block_table", block_table, 2, (torch.int32,), "int32[B, max_pages]")
    _checks.check_tensor("seq_lens", seq_lens, 1, (torch.int32,), "int32[B]")
    B, max_pages = block_table.shape
    _, Hkv, page, D = k.shape
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens: expected shape [{B}] like block_table's rows, got {tuple(seq_lens.shape)}")
    used = torch.arange(max_pages, device=block_table.device) < (seq_lens[:, None] + page - 1) // page
    table = torch.where(used, block_table, 0).long()  # entries past a request's pages may hold anything
    if _checks.values_checkable(block_table) and bool(used.any()):
        lo, hi = int(block_table[used].min()), int(block_table[used].max())
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"block_table: expected page indices in [0, {k.shape[0]}), got [{lo}, {hi}]")
    keys = k[table].permute(0, 2, 1, 3, 4).reshape(B, Hkv, max_pages * page, D)
    return attention_scores(q, keys, seq_lens, heads=heads, block_size=block_size, scale=scale, backend=backend)
