"""select_tokens: Dustin's per-sequence choice of history blocks for sparse verification.

The README's second op. Every block score becomes a unique int64 key, (order-preserving int32 of
the fp32 score, NaN below -inf) << 32 | (2^32 - 1 - block): a higher key is a higher score, then a lower
block (the tie rule), so "the top q blocks" is "the blocks whose key is at least the q-th largest key".
Two backends:

- torch: the keys of the whole batch, torch.topk for each signal's threshold, one sort to list the
  chosen blocks ascending;
- triton (`templates/select_tokens.py.j2`): chunk_topk (a bitonic top-K per chunk of blocks), threshold
  (merge of a sequence's chunk lists into the draft threshold), emit (merge into the last signal's
  threshold, then the chosen blocks in order). The quotas are host ints (budget, m, sink, recent); every
  per-sequence decision happens in the kernels, so the launcher never syncs.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, codegen, dispatch, library
from ..spec import KernelSpec, next_pow2

KEY_MIN = -(1 << 63)  # key of blocks that are not candidates
AOT_QUOTA = 512  # quota of the AOT check: the paper's budget 512 (sink 4, recent 16) leaves 492 blocks


def default_config(spec: KernelSpec, *, batch: int, context: int) -> dict:
    """Launch config when the perf DB has no entry; context = W, the score columns (history blocks).

    - interpreter: TILE next_pow2(W) / 16 clamped to [32, 256], CHUNK and EMIT_TILE 4 * TILE (tests walk
      several tiles and chunks; the interpreter pays per step, not per element);
    - GPU: TILE (blocks per chunk_topk step) min(1024, next_pow2(W)); CHUNK (blocks per chunk_topk
      program) TILE * next_pow2(B * W / (128 * TILE)) clamped to [1, 8] tiles, so that about 128
      programs share the batch; EMIT_TILE (blocks per emit step) min(4096, next_pow2(W)), at least 256;
      num_warps 8 when a tile holds 2048 blocks or more, else 4; num_stages 1.
    The launcher raises TILE to K = next_pow2(quota) where a quota needs it, and CHUNK to TILE.
    """
    width = next_pow2(max(context, 1))
    if spec.arch == "interp":
        tile = min(256, max(32, width // 16))
        return {"TILE": tile, "CHUNK": 4 * tile, "EMIT_TILE": 4 * tile, "num_warps": 4, "num_stages": 1}
    tile = min(1024, width)
    chunk = tile * min(8, next_pow2(math.ceil(max(batch, 1) * context / (128 * tile))))
    emit_tile = max(256, min(4096, width))
    warps = 8 if max(tile, emit_tile) >= 2048 else 4
    return {"TILE": tile, "CHUNK": chunk, "EMIT_TILE": emit_tile, "num_warps": warps, "num_stages": 1}


def _quotas(s_draft, s_target, free: int, m: int) -> tuple[int, int]:
    """Blocks the draft and the target choose in a sequence whose history exceeds the budget."""
    n_draft = 0 if s_draft is None else free if s_target is None else min(m, free)
    return n_draft, free - n_draft


def _torch_keys(scores, lo: int, hi):
    """int64 keys [B, W] of the score rows; KEY_MIN outside blocks [lo, hi[b])."""
    blocks = torch.arange(scores.shape[1], device=scores.device)
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 ties with +0.0
    bits = s.view(torch.int32).masked_fill(s.isnan(), -1)  # NaN: -1, the lowest key below
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed int order = float order (NaN below -inf)
    key = (bits.long() << 32) | (0xFFFFFFFF - blocks)
    cand = (blocks >= lo) & (blocks < hi[:, None])
    return key.masked_fill_(~cand, KEY_MIN)


def _width(s_draft, s_target) -> int:
    """Score columns read: the narrower score width (both hold every history block)."""
    return min(s.shape[1] for s in (s_draft, s_target) if s is not None)


def _torch_select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size, idx=None,
                         count=None):
    """(idx, count), written into the given tensors (new ones when None)."""
    W = _width(s_draft, s_target)
    n = (seq_lens.long() - window + block_size - 1) // block_size  # history blocks [B]
    blocks = torch.arange(W, device=seq_lens.device)
    chosen = (blocks < n[:, None]) & ((n[:, None] <= budget) | (blocks < sink) | (blocks >= (n - recent)[:, None]))
    n_draft, n_target = _quotas(s_draft, s_target, budget - sink - recent, m)
    if W > budget:  # else every history fits the budget
        hi = n - recent
        for scores, quota in ((s_draft, n_draft), (s_target, n_target)):
            if quota:
                key = _torch_keys(scores[:, :W], sink, hi).masked_fill_(chosen, KEY_MIN)
                chosen |= (n[:, None] > budget) & (key >= key.topk(quota, dim=1).values[:, -1:])
    listed = blocks.masked_fill(~chosen, W).sort(dim=1).values[:, :budget]  # chosen blocks first, ascending
    idx = torch.empty(len(seq_lens), budget, dtype=torch.int32, device=seq_lens.device) if idx is None else idx
    idx.fill_(-1)
    idx[:, : listed.shape[1]] = torch.where(listed < W, listed, -1)
    counted = chosen.sum(1, dtype=torch.int32)
    return idx, counted if count is None else count.copy_(counted)


def _launch_config(config: dict, quota: int) -> tuple[int, int, int]:
    """(K, TILE, CHUNK) for a quota: K = next_pow2(quota) (at least 2), TILE >= K, CHUNK >= TILE."""
    k = max(2, next_pow2(quota))
    tile = max(config["TILE"], k)
    return k, tile, max(config["CHUNK"], tile)


def _triton_select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size, idx=None,
                          count=None):
    """(idx, count), written into the given tensors (new ones when None)."""
    scores = s_draft if s_draft is not None else s_target
    B, W = scores.shape[0], _width(s_draft, s_target)
    device = scores.device
    seq_lens = seq_lens.contiguous()  # the kernels read seq_lens[b] at offset b
    spec = KernelSpec(kernel="select_tokens", arch=dispatch.arch_for(device), block_size=block_size)
    mod = codegen.load(spec)
    config = dispatch.config_for(spec, B, W, default_config, device=device)
    warps, stages = config["num_warps"], config["num_stages"]
    n_draft, n_target = _quotas(s_draft, s_target, budget - sink - recent, m)
    if W <= budget:  # every history fits the budget
        n_draft = n_target = 0
    idx = torch.empty(B, budget, dtype=torch.int32, device=device) if idx is None else idx
    count = torch.empty(B, dtype=torch.int32, device=device) if count is None else count
    thr_d = torch.empty(B, dtype=torch.int64, device=device)
    d_args = (s_draft, *s_draft.stride()) if s_draft is not None else (scores, 0, 0)
    t_args = (s_target, *s_target.stride()) if s_target is not None else (scores, 0, 0)
    lists, n_chunks, last_k, last_quota = thr_d, 1, 1, 1  # placeholders when no signal chooses

    def chunk_lists(s_args, quota, exclude_draft):
        k, tile, chunk = _launch_config(config, quota)
        n = math.ceil(W / chunk)
        out = torch.empty(B, n, k, dtype=torch.int64, device=device)
        mod.chunk_topk[(B, n)](*s_args, *d_args, thr_d, seq_lens, out, W, window, sink, recent,
                               EXCLUDE_DRAFT=exclude_draft, K=k, TILE=tile, CHUNK=chunk,
                               num_warps=warps, num_stages=stages)
        return out, n, k

    if n_draft:
        lists, n_chunks, last_k = chunk_lists(d_args, n_draft, False)
        last_quota = n_draft
        if n_target:
            mod.threshold[(B,)](lists, thr_d, n_chunks, n_draft, K=last_k, num_warps=warps, num_stages=stages)
    if n_target:
        lists, n_chunks, last_k = chunk_lists(t_args, n_target, n_draft > 0)
        last_quota = n_target
    mod.emit[(B,)](*d_args, *t_args, thr_d, lists, n_chunks, last_quota, seq_lens, idx, count,
                   W, window, sink, recent, budget, USE_DRAFT=n_draft > 0, USE_TARGET=n_target > 0,
                   K=last_k, TILE=config["EMIT_TILE"], num_warps=warps, num_stages=stages)
    return idx, count


@library.custom_op("select_tokens", mutates_args=("idx", "count"))
def _select_tokens_into(s_draft: torch.Tensor | None, s_target: torch.Tensor | None, seq_lens: torch.Tensor,
                        idx: torch.Tensor, count: torch.Tensor, budget: int, m: int, sink: int, recent: int,
                        window: int, block_size: int, backend: str) -> None:
    """Unchecked `select_tokens` into idx int32[B, budget] and count int32[B] (contiguous)."""
    if idx.shape[0]:
        run = _triton_select_tokens if backend == "triton" else _torch_select_tokens
        run(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size, idx, count)


def aot_specs(arch: str) -> list[KernelSpec]:
    """Block sizes 1, 16 and 128 (the scores are compared in fp32 whatever their dtype: one flavour)."""
    return [KernelSpec("select_tokens", arch, block_size=bs) for bs in (1, 16, 128)]


def aot_kernels(spec: KernelSpec, config: dict) -> list:
    """chunk_topk (draft, and target excluding the draft), threshold and emit, at quota AOT_QUOTA."""
    from ..aot import AotKernel

    mod = codegen.load(spec)
    k, tile, chunk = _launch_config(config, AOT_QUOTA)
    warps, stages = config["num_warps"], config["num_stages"]
    scores = {"s_ptr": "*fp32", "s_stride_b": "i32", "s_stride_w": "i32",
              "d_ptr": "*fp32", "d_stride_b": "i32", "d_stride_w": "i32"}
    topk_sig = {**scores, "thr_d_ptr": "*i64", "seq_lens_ptr": "*i32", "lists_ptr": "*i64", "W": "i32",
                "window": "i32", "sink": "i32", "recent": "i32", "EXCLUDE_DRAFT": "constexpr", "K": "constexpr",
                "TILE": "constexpr", "CHUNK": "constexpr"}
    thr_sig = {"lists_ptr": "*i64", "thr_ptr": "*i64", "n_chunks": "i32", "quota": "i32", "K": "constexpr"}
    emit_sig = {"d_ptr": "*fp32", "d_stride_b": "i32", "d_stride_w": "i32",
                "t_ptr": "*fp32", "t_stride_b": "i32", "t_stride_w": "i32", "thr_d_ptr": "*i64",
                "lists_ptr": "*i64", "n_chunks": "i32", "quota": "i32", "seq_lens_ptr": "*i32", "idx_ptr": "*i32",
                "count_ptr": "*i32", "W": "i32", "window": "i32", "sink": "i32", "recent": "i32", "budget": "i32",
                "USE_DRAFT": "constexpr", "USE_TARGET": "constexpr", "K": "constexpr", "TILE": "constexpr"}
    topk = {"K": k, "TILE": tile, "CHUNK": chunk}
    return [
        AotKernel(mod.chunk_topk, topk_sig, {**topk, "EXCLUDE_DRAFT": False}, warps, stages),
        AotKernel(mod.chunk_topk, topk_sig, {**topk, "EXCLUDE_DRAFT": True}, warps, stages),
        AotKernel(mod.threshold, thr_sig, {"K": k}, warps, stages),
        AotKernel(mod.emit, emit_sig, {"USE_DRAFT": True, "USE_TARGET": True, "K": k,
                                       "TILE": config["EMIT_TILE"]}, warps, stages),
    ]


def _check_scores(name: str, scores, batch: int | None) -> None:
    if scores is None:
        return
    _checks.check_tensor(name, scores, 2, shape_doc="[B, W]")
    if batch is not None and scores.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [B={batch}, W] like s_draft, got {tuple(scores.shape)}")


def select_tokens(s_draft, s_target, seq_lens, *, budget, m, sink=4, recent=16, window, block_size=1,
                  backend=None, out=None):
    """The history blocks each sequence's sparse verification attends to, by Dustin's rule.

    s_draft, s_target: float32/float16/bfloat16 [B, W] block scores (draft lookahead, target history),
    either may be None (not both); W >= the most history blocks of any sequence, columns past a
    sequence's history are ignored. seq_lens: int32[B], each >= window (T), the window included.
    budget, m, sink, recent count blocks of block_size (a power of two) tokens; history blocks are
    0 .. ceil((seq_lens - window) / block_size) - 1. All of them are chosen when they fit the budget;
    else blocks [0, sink), the last `recent`, the top min(m, budget - sink - recent) others by s_draft
    (all of the free budget when s_target is None), the rest of the budget by s_target; ties go to the
    lower block, and a NaN score ranks lowest (below -inf). Returns (idx int32[B, budget]: chosen blocks
    ascending, -1 padded; count int32[B]), written into out=(idx, count) when given (contiguous tensors
    of those shapes). An inference op (no autograd): tensors that require grad are refused. Also
    `torch.ops.dustin_kernels.select_tokens` (`dustin_kernels.library`).
    """
    _checks.check_int("budget", budget, 1)
    _checks.check_int("sink", sink, 0)
    _checks.check_int("recent", recent, 0)
    if sink + recent > budget:
        raise ValueError(f"budget: expected at least sink + recent = {sink + recent} blocks, got {budget}")
    _checks.check_int("m", m, 0, budget)
    _checks.check_int("window", window, 1)
    _checks.check_power_of_two("block_size", block_size)
    if s_draft is None and s_target is None:
        raise ValueError("s_draft, s_target: expected at least one score tensor [B, W], got None for both")
    _check_scores("s_draft", s_draft, None)
    _check_scores("s_target", s_target, None if s_draft is None else s_draft.shape[0])
    given = {name: s for name, s in (("s_draft", s_draft), ("s_target", s_target)) if s is not None}
    B = next(iter(given.values())).shape[0]
    _checks.check_tensor("seq_lens", seq_lens, 1, (torch.int32,), "int32[B]")
    if seq_lens.shape[0] != B:
        raise ValueError(f"seq_lens: expected shape [{B}] (one length per score row), got {tuple(seq_lens.shape)}")
    device = _checks.check_same_device(s_draft=s_draft, s_target=s_target, seq_lens=seq_lens)
    if B and _checks.values_checkable(seq_lens):
        lo, hi = torch.stack([seq_lens.min(), seq_lens.max()]).tolist()
        if lo < window:
            raise ValueError(f"seq_lens: every length must hold the window of {window} tokens, got a length {lo}")
        need = (hi - window + block_size - 1) // block_size
        for name, s in given.items():
            if s.shape[1] < need:
                raise ValueError(f"{name}: expected [B, W] with W >= {need} (history blocks of the longest "
                                 f"sequence at block_size {block_size}), got shape {tuple(s.shape)}")
    backend = dispatch.backend_for(backend, device)
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"out: expected None or a pair (idx int32[B, budget], count int32[B]), got {type(out).__name__}"
                        f"{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''}")
    idx, count = out or (None, None)
    idx = _checks.check_out(idx, (B, budget), torch.int32, device, "out[0] (idx)")
    count = _checks.check_out(count, (B,), torch.int32, device, "out[1] (count)")
    _select_tokens_into(s_draft, s_target, seq_lens, idx, count, budget, m, sink, recent, window, block_size, backend)
    return idx, count
