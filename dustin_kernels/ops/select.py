"""select_tokens: Dustin's per-sequence choice of history blocks for sparse verification.

The README's second op. Every block score becomes a unique int64 key, (order-preserving int32 of
the fp32 score, NaN below -inf) << 32 | (2^32 - 1 - block): a higher key is a higher score, then a lower
block (the tie rule), so "the top q blocks" is "the blocks whose key is at least the q-th largest key".
Two backends:

- torch: the keys of the whole batch, torch.topk for each signal's threshold, one sort to list the
  chosen blocks ascending;
- triton (`templates/select_tokens.py.j2`): one launch, grid (B, cdiv(W, CHUNK)): each chunk program
  lists its chunk's top n_draft by the draft and top free (n_draft + n_target) by the target (enough:
  the template says why) by a radix select over the 32-bit score part of the key (tl.histogram,
  RADIX_BITS per pass, stopping at the first pass whose boundary bin is taken whole; ties by lower
  block, a running tl.cumsum in block order); the row's last program to arrive (an arrival counter)
  runs the same selects over the lists (the target among the blocks the draft left) and writes the
  chosen blocks in order. The quotas are host ints (budget, m, sink, recent) and the workspace is
  allocated per call; every per-sequence decision happens in the kernel, so the launcher never syncs
  (CUDA-graph capturable).
"""
from __future__ import annotations

import torch

from .. import _checks, codegen, dispatch, library
from ..family import AotKernel, OpFamily
from ..spec import KernelSpec, Launch, next_pow2

KEY_MIN = -(1 << 63)  # key of blocks that are not candidates


def launch(arch: str, *, batch: int, width: int, block_size: int) -> Launch:
    """The `Launch` of a call (its spec and perf-DB key): its context is W, the score columns read."""
    return Launch(KernelSpec("select_tokens", arch, block_size=block_size), batch, width)


def default_config(launch: Launch) -> dict:
    """Launch config when the perf DB has no entry; the launch's context is W, the score columns.

    - interpreter: TILE next_pow2(W) / 8 clamped to [32, 256] (tests walk several tiles per pass; the
      interpreter pays per step, not per element), CHUNK next_pow2(W) / 2 (at least TILE, at most 16384:
      the tests' rows run 2 chunk programs and a merge), RADIX_BITS 8 (4 passes), num_warps 4;
    - GPU: CHUNK next_pow2(W) / 8 clamped to [1024, 8192] (32K score columns: 8 chunks per row, 128K: 16;
      the merge walks chunks x (m, free + m, free + 2 m) list slots (free = budget - sink - recent): wider
      rows take wider chunks), TILE min(CHUNK, 2048), num_warps TILE / 256 (8 blocks per thread),
      RADIX_BITS 7 (128 histogram bins, at most 5 passes per signal: tl.histogram costs log2(bins) warp
      ballots plus bins / 32 popcounts per block, so wide digits cost more per key bit, narrow ones more
      passes); num_stages 1.
    The batch does not matter (each row has its own programs).
    """
    width = next_pow2(max(launch.context, 1))
    if launch.spec.arch == "interp":
        tile = min(256, max(32, width // 8))
        return {"CHUNK": min(16384, max(tile, width // 2)), "TILE": tile, "RADIX_BITS": 8, "num_warps": 4,
                "num_stages": 1}
    chunk = min(8192, max(1024, width // 8))
    tile = min(chunk, 2048)
    return {"CHUNK": chunk, "TILE": tile, "RADIX_BITS": 7, "num_warps": tile // 256, "num_stages": 1}


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


def _list_slots(n_draft: int, n_target: int, chunk: int) -> tuple[int, int, int]:
    """Slots of a chunk's draft list (its top n_draft by the draft), target list (its top n_draft + n_target
    by the target: the template's docstring says why those quotas lose no pick) and their union, each at
    most the chunk's blocks."""
    draft, target = n_draft, n_draft + n_target if n_target else 0
    return min(chunk, draft), min(chunk, target), min(chunk, draft + target)


def _triton_select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size, idx=None,
                          count=None):
    """(idx, count), written into the given tensors (new ones when None): one launch, grid (B, P) of P =
    cdiv(W, CHUNK) chunk programs per row. Workspace (per call, no host sync): the chunks' candidate lists
    (int32[B, P, QD + QT + QU]: draft, target, union) and the arrival counters int32[B], zero (the row's
    last program sets its counter back to zero)."""
    scores = s_draft if s_draft is not None else s_target
    B, W = scores.shape[0], _width(s_draft, s_target)
    device = scores.device
    seq_lens = seq_lens.contiguous()  # the kernel reads seq_lens[b] at offset b
    call = launch(dispatch.arch_for(device), batch=B, width=W, block_size=block_size)
    config = dispatch.config_for(call, default_config, device=device)
    n_draft, n_target = _quotas(s_draft, s_target, budget - sink - recent, m)
    if W <= budget:  # every history fits the budget
        n_draft = n_target = 0
    chunks = -(-W // config["CHUNK"]) if n_draft + n_target else 1
    slots = _list_slots(n_draft, n_target, config["CHUNK"])
    lists = torch.empty(max(1, B * chunks * sum(slots)), dtype=torch.int32, device=device)
    arrived = torch.zeros(B, dtype=torch.int32, device=device)
    idx = torch.empty(B, budget, dtype=torch.int32, device=device) if idx is None else idx
    count = torch.empty(B, dtype=torch.int32, device=device) if count is None else count
    d_args = (s_draft, *s_draft.stride()) if s_draft is not None else (scores, 0, 0)
    t_args = (s_target, *s_target.stride()) if s_target is not None else (scores, 0, 0)
    codegen.load(call.spec).select_tokens[(B, chunks)](
        *d_args, *t_args, seq_lens, idx, count, lists, arrived, W, window, sink, recent, budget, n_draft, n_target,
        *slots, USE_DRAFT=n_draft > 0, USE_TARGET=n_target > 0, CHUNK=config["CHUNK"], TILE=config["TILE"],
        RADIX_BITS=config["RADIX_BITS"], num_warps=config["num_warps"], num_stages=config["num_stages"])
    return idx, count


@library.custom_op("select_tokens", mutates_args=("idx", "count"))
def _select_tokens_into(s_draft: torch.Tensor | None, s_target: torch.Tensor | None, seq_lens: torch.Tensor,
                        idx: torch.Tensor, count: torch.Tensor, budget: int, m: int, sink: int, recent: int,
                        window: int, block_size: int, backend: str) -> None:
    """Unchecked `select_tokens` into idx int32[B, budget] and count int32[B] (contiguous)."""
    if idx.shape[0]:
        run = _triton_select_tokens if backend == "triton" else _torch_select_tokens
        run(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size, idx, count)


def aot_launches(arch: str) -> list[Launch]:
    """Block sizes 1, 16 and 128 (the scores are compared in fp32 whatever their dtype: one flavour), batch
    16, 32K score columns."""
    return [launch(arch, batch=16, width=32768, block_size=bs) for bs in (1, 16, 128)]


def aot_kernels(spec: KernelSpec, config: dict) -> list:
    """The one kernel with both signals (the path with the most live state: the target's passes exclude
    the draft's blocks), unit column strides as the JIT specialises them."""
    types = {"d_ptr": "*fp32", "t_ptr": "*fp32", "seq_lens_ptr": "*i32", "idx_ptr": "*i32", "count_ptr": "*i32",
             "list_ptr": "*i32", "arrived_ptr": "*i32"}
    constexprs = {"USE_DRAFT": True, "USE_TARGET": True, "CHUNK": config["CHUNK"], "TILE": config["TILE"],
                  "RADIX_BITS": config["RADIX_BITS"], "d_stride_w": 1, "t_stride_w": 1}
    return [AotKernel.of(codegen.load(spec).select_tokens, types, constexprs, config["num_warps"],
                         config["num_stages"])]


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


FAMILY = OpFamily("select_tokens", launch, default_config, aot_launches, aot_kernels)
