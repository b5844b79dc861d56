"""Sparse verification attention (the README's third op) and its dense and paged modes.

Each window query attends the selected history blocks plus the causal window. The Triton kernel packs
the G*T query rows of one KV head into one tile, so every selected K/V row is read once for all of
them; it walks the selected keys and then the window keys as one pipelined stream of tiles, and may
split that stream across `num_splits` programs (flash-decoding): the last of them to finish merges
the partial results (one launch; arrival counters in the workspace). Template:
`templates/sparse_verify.py.j2`; variants "" (token or block index), "dense" (every history token) and
"paged" (index over a paged cache). The Triton launcher is `_resolve` (spec, launch config, workspace)
then `_launch`: the ops do both per call, `VerifyPlan` resolves once per step and launches once per layer.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, codegen, dispatch, library
from ..family import AotKernel, OpFamily
from ..shapes import PRESETS
from ..spec import DTYPE_NAMES, KernelSpec, Launch, next_pow2

_SMS = {"sm80": 108, "sm90": 132, "interp": 1}  # the interpreter runs programs one after another
_WAVES = {"sm90": 1}  # programs per SM that split-KV aims for (default 2)
_TORCH_CHUNK_ELEMS = 1 << 24  # fp32 elements of one gathered K chunk in the torch backend


def _block_m(spec: KernelSpec) -> int:
    return max(16, next_pow2(spec.group * spec.window))


def launch(arch: str, dtype: str, *, batch: int, q_heads: int, kv_heads: int, window: int, head_dim: int,
           slots: int, block_size: int, variant: str) -> Launch:
    """The `Launch` of a call (its spec and perf-DB key): `slots` is the number of history slots a sequence
    may read (idx width x block_size; the history length N_max - T for the dense variant). The split count
    depends on the KV heads: they are part of the key."""
    spec = KernelSpec("sparse_verify", arch, dtype, head_dim=head_dim, group=q_heads // kv_heads, window=window,
                      block_size=block_size if variant != "dense" else 1, variant=variant)
    return Launch(spec, batch, slots, kv_heads)


def default_config(launch: Launch) -> dict:
    """Launch settings used when the perf DB has no entry; the launch's context is its history slots
    (`launch`), its kv_heads Hkv.
    - BLOCK_N: 64 key rows per tile, 32 when the padded head dim exceeds 128;
    - num_warps: 4, or 8 when the fp32 accumulator BLOCK_M x BLOCK_D exceeds 8192 elements
      (BLOCK_M = G*T rounded up to a power of two >= 16);
    - except BLOCK_N 16 and 8 warps for fp32 (its ieee dots run on FMA units and hold whole operands
      in registers) and on sm80 when BLOCK_M < BLOCK_D and the accumulator exceeds 4096 elements (the
      mma layout then spreads the warps along the head dim and each warp holds all query rows);
    - num_stages: 2, a ring of two K and V tiles in shared memory (82 KB at the 72B shape on sm90, so two
      programs share an SM; 3 stages take 115 KB and leave one);
    - num_splits: ceil(waves * SMs / (batch * kv_heads)) (SMs: 132 for sm90, 108 for sm80, 1 for the
      interpreter), clamped to [1, ceil(context / BLOCK_N)]; one wave on sm90 (two programs per SM), measured
      on an H200 at the Qwen2.5-72B shape, batch 16, budget 512 with the previous kernel (a separate merge
      kernel, index loads inside the K/V loop; tools/results/h200-sweep): 2 splits 29.6 us, 3 splits (two
      waves) 43.7 us, 4 / 8 / 16 splits 44-80 us. The splits now merge inside the forward kernel; the rule
      is kept until it is re-measured (1 split with BLOCK_N 128 and 8 warps compiles without spills, untimed).
      Two waves on sm80 (not measured);
    - the interpreter: 4 warps and 1 stage (it ignores both; its search space allows only these);
    - HALF_PARTIALS: 0, the splits' partial outputs in fp32. 1 stores them in q's dtype (fp16 / bf16),
      half the workspace bytes, one more rounding before the fp32 merge: 3% faster at 2 splits of the 72B
      headline shape on an H200 with the previous kernel (28.7 vs 29.6 us, tools/results/h200-session2), one
      measurement; the tuned DB takes it, the rule stays fp32.
    """
    spec, batch, context, kv_heads = launch.spec, launch.batch, launch.context, launch.kv_heads
    block_m, block_d = _block_m(spec), next_pow2(spec.head_dim)
    narrow = spec.dtype == "fp32" or (spec.arch == "sm80" and block_m < block_d and block_m * block_d > 4096)
    block_n = 16 if narrow else 64 if block_d <= 128 else 32
    programs = max(1, batch * kv_heads)
    tiles = max(1, math.ceil(context / block_n))
    interp = spec.arch == "interp"  # the interpreter ignores warps and stages: its search space pins them
    return {
        "BLOCK_N": block_n,
        "num_warps": 8 if (narrow or block_m * block_d > 8192) and not interp else 4,
        "num_stages": 1 if interp else 2,
        "num_splits": max(1, min(math.ceil(_WAVES.get(spec.arch, 2) * _SMS[spec.arch] / programs), tiles)),
        "HALF_PARTIALS": 0,
    }


# ----------------------------------------------------------------------------------------------------
# torch backend


def _torch_sparse_verify(q, k, v, seq_lens, idx, count, block_table, *, block_size, scale, variant):
    """(out [B, Hq, T, D] in q's dtype, lse float32 [B, Hq, T]): gather + batched matmul in fp32 with
    an online softmax over key chunks (so a 128K dense history never materialises at once)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    device = q.device
    ctx = seq_lens.long() - T  # [B]
    qf = q.reshape(B, Hkv, G * T, D).float() * scale  # row r = g * T + t of KV head h is q head h*G + g
    t_of_row = torch.arange(G * T, device=device) % T
    batch = torch.arange(B, device=device)[:, None]

    def rows(pos):  # pos int64[B, C] -> K, V float32[B, Hkv, C, D]
        if variant == "paged":
            page = block_table.long().gather(1, pos // k.shape[2])
            pos = pos % k.shape[2]
            return k[page, :, pos].transpose(1, 2).float(), v[page, :, pos].transpose(1, 2).float()
        return k[batch, :, pos].transpose(1, 2).float(), v[batch, :, pos].transpose(1, 2).float()

    m = torch.full((B, Hkv, G * T), float("-inf"), device=device)
    l = torch.zeros(B, Hkv, G * T, device=device)
    acc = torch.zeros(B, Hkv, G * T, D, device=device)

    def attend(kf, vf, mask):  # online-softmax step over one key chunk; mask broadcasts to the scores
        nonlocal m, l, acc
        s = (qf @ kf.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)
        alpha = torch.exp(m - m_use)
        p = torch.exp(s - m_use[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p @ vf
        m = m_new

    window = torch.arange(T, device=device)
    attend(*rows(ctx[:, None] + window), (window[None, :] <= t_of_row[:, None]))

    n_slots = k.shape[2] - T if variant == "dense" else idx.shape[1] * block_size
    chunk = max(128, _TORCH_CHUNK_ELEMS // max(1, B * Hkv * max(D, G * T)))
    for start in range(0, n_slots, chunk):
        slots = torch.arange(start, min(start + chunk, n_slots), device=device)
        if variant == "dense":
            ok = slots[None, :] < ctx[:, None]
            kf, vf = k[:, :, start:start + len(slots)].float(), v[:, :, start:start + len(slots)].float()
        else:
            pos = idx[:, slots // block_size].long() * block_size + slots % block_size
            ok = ((slots // block_size)[None, :] < count[:, None]) & (pos < ctx[:, None])
            kf, vf = rows(torch.where(ok, pos, 0))
        vf = vf.masked_fill(~ok[:, None, :, None], 0.0)  # a weight of 0 times a stale NaN / inf is still NaN
        attend(kf, vf, ok[:, None, None, :])

    out = (acc / l[..., None]).reshape(B, Hq, T, D).to(q.dtype)
    return out, (m + torch.log(l)).reshape(B, Hq, T)


# ----------------------------------------------------------------------------------------------------
# Triton backend


def _resolve(q, k, idx, *, block_size, variant) -> tuple:
    """(module, launch config, workspace) of the Triton kernel for these shapes: the launch config comes from
    `dispatch.config_for` (pinned with `dispatch.override(config, kernel="sparse_verify")`). With
    num_splits > 1 the workspace is (partial outputs [B*Hq*T, splits, D] in fp32 or, with HALF_PARTIALS, q's
    dtype; their base-2 lse float32 [B*Hq*T, splits]; arrival counters int32[B*Hkv], zero, which the kernel's
    merging program sets back to zero, so one workspace serves any number of launches in stream order)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    call = launch(dispatch.arch_for(q.device), DTYPE_NAMES[q.dtype], batch=B, q_heads=Hq, kv_heads=Hkv, window=T,
                  head_dim=D, slots=k.shape[2] - T if variant == "dense" else idx.shape[1] * block_size,
                  block_size=block_size, variant=variant)
    config = dispatch.config_for(call, default_config, device=q.device)
    splits = config["num_splits"]
    if splits > 1:
        ws_dtype = q.dtype if config["HALF_PARTIALS"] else torch.float32
        workspace = (torch.empty(B * Hq * T, splits, D, dtype=ws_dtype, device=q.device),
                     torch.empty(B * Hq * T, splits, dtype=torch.float32, device=q.device),
                     torch.zeros(B * Hkv, dtype=torch.int32, device=q.device))
    else:  # unused by the kernel when NUM_SPLITS == 1
        workspace = None
    return codegen.load(call.spec), config, workspace


def _launch(resolved, q, k, v, seq_lens, idx, count, block_table, out, lse, scale) -> None:
    """Launch the resolved kernel (`_resolve`) into out [B, Hq, T, D] and lse float32 [B, Hq, T], both
    contiguous; seq_lens, idx, count and block_table contiguous. One launch, no allocation, no host sync."""
    mod, config, workspace = resolved
    B = q.shape[0]
    splits = config["num_splits"]
    ws_o, ws_lse, arrived = workspace or (lse, lse, seq_lens)  # NUM_SPLITS == 1 never touches them
    indexed = [idx, count] if idx is not None else []
    table = [block_table] if block_table is not None else []
    extra = ([idx.stride(0), idx.shape[1]] if idx is not None else []) + [t.stride(0) for t in table]
    page = {"PAGE_SIZE": k.shape[2]} if table else {}
    mod.sparse_verify_fwd[(k.shape[1], B, splits)](
        q, k, v, seq_lens, *indexed, *table, out, lse, ws_o, ws_lse, arrived,
        scale * math.log2(math.e), *q.stride(), *k.stride(), *v.stride(), *extra, **page,
        BLOCK_N=config["BLOCK_N"], NUM_SPLITS=splits,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def _verify(q, k, v, seq_lens, idx, count, block_table, out, lse, *, block_size, scale, variant, resolved) -> None:
    """Attention into out and lse: the Triton kernel `resolved` by `_resolve`, or the torch backend (None)."""
    if resolved is None:
        o, l = _torch_sparse_verify(q, k, v, seq_lens, idx, count, block_table, block_size=block_size, scale=scale,
                                    variant=variant)
        out.copy_(o)
        lse.copy_(l)
    else:
        _launch(resolved, q, k, v, seq_lens, idx, count, block_table, out, lse, scale)


def _triton_sparse_verify(q, k, v, seq_lens, idx, count, block_table, *, block_size, scale, variant):
    """The Triton backend with `_torch_sparse_verify`'s signature: (out, lse), new tensors."""
    out, lse = _outputs(q, None)
    _verify_into(q, k, v, seq_lens, idx, count, block_table, out, lse, block_size, scale, variant, "triton")
    return out, lse


def _verify_into(q, k, v, seq_lens, idx, count, block_table, out, lse, block_size, scale, variant, backend) -> None:
    """One unchecked call: resolve (Triton) and run."""
    seq_lens, idx, count, block_table = (t if t is None else t.contiguous() for t in (seq_lens, idx, count, block_table))
    resolved = _resolve(q, k, idx, block_size=block_size, variant=variant) if backend == "triton" else None
    _verify(q, k, v, seq_lens, idx, count, block_table, out, lse, block_size=block_size, scale=scale,
            variant=variant, resolved=resolved)


@library.custom_op("sparse_verify", mutates_args=("out", "lse"))
def _sparse_verify_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                        idx: torch.Tensor, count: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        block_size: int, scale: float, backend: str) -> None:
    """Unchecked `sparse_verify` into out [B, Hq, T, D] and lse float32 [B, Hq, T] (contiguous)."""
    _verify_into(q, k_cache, v_cache, seq_lens, idx, count, None, out, lse, block_size, scale, "", backend)


@library.custom_op("sparse_verify_paged", mutates_args=("out", "lse"))
def _sparse_verify_paged_into(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, idx: torch.Tensor,
                              count: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, block_size: int,
                              scale: float, backend: str) -> None:
    """Unchecked `sparse_verify_paged` into out [B, Hq, T, D] and lse float32 [B, Hq, T] (contiguous)."""
    _verify_into(q, k_pages, v_pages, seq_lens, idx, count, block_table, out, lse, block_size, scale, "paged",
                 backend)


@library.custom_op("dense_verify", mutates_args=("out", "lse"))
def _dense_verify_into(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str) -> None:
    """Unchecked `dense_verify` into out [B, Hq, T, D] and lse float32 [B, Hq, T] (contiguous)."""
    _verify_into(q, k_cache, v_cache, seq_lens, None, None, None, out, lse, 1, scale, "dense", backend)


def aot_launches(arch: str) -> list[Launch]:
    """bf16 launches of the model shapes of `shapes.PRESETS` (with their KV heads) at T 1/5/16, block sizes
    1/16 and the three variants, plus head dims 80/96/256 at group 8 over 8 KV heads; batch 16, 512 history
    slots (the dense variant: 32K)."""
    shapes = dict.fromkeys((s.head_dim, s.group, s.kv_heads) for s in PRESETS.values())  # headline (72B) first
    calls = [(d, g, hkv, t, bs, var) for d, g, hkv in shapes for t in (5, 1, 16)
             for bs, var in ((1, ""), (16, ""), (1, "paged"), (1, "dense")) if t == 5 or (bs, var) == (1, "")]
    calls += [(d, 8, 8, 5, 1, "") for d in (80, 96, 256)]
    return [launch(arch, "bf16", batch=16, q_heads=g * hkv, kv_heads=hkv, window=t, head_dim=d,
                   slots=32768 if var == "dense" else 512, block_size=bs, variant=var)
            for d, g, hkv, t, bs, var in calls]


def aot_kernels(spec: KernelSpec, config: dict) -> list[AotKernel]:
    """The forward kernel (it merges the splits itself) with argument types; strides along the head dim are
    taken as 1, the other strides and the idx width as multiples of 16, and a paged cache has 16-token pages."""
    fn = codegen.load(spec).sparse_verify_fwd
    elem = f"*{spec.dtype}"
    types = {"Q": elem, "K": elem, "V": elem, "O": elem, "LSE": "*fp32", "WS_LSE": "*fp32",
             "WS_O": elem if config["HALF_PARTIALS"] else "*fp32", "ARRIVED": "*i32",
             "SEQ_LENS": "*i32", "IDX": "*i32", "COUNT": "*i32", "BLOCK_TABLE": "*i32", "scale_log2": "fp32"}
    constexprs = {"BLOCK_N": config["BLOCK_N"], "NUM_SPLITS": config["num_splits"], "PAGE_SIZE": 16,
                  "stride_qd": 1, "stride_kd": 1, "stride_vd": 1}
    aligned = [name for name in fn.arg_names  # row strides, and an idx width like the headline's 512
               if (name.startswith("stride") or name == "idx_width") and name not in constexprs]
    return [AotKernel.of(fn, types, constexprs, config["num_warps"], config["num_stages"], aligned)]


# ----------------------------------------------------------------------------------------------------
# public API


def _check_kv(q, k, v, k_name: str, v_name: str, shape_doc: str) -> None:
    _checks.check_tensor(v_name, v, 4, shape_doc=shape_doc)
    if v.shape != k.shape:
        raise ValueError(f"{v_name}: expected the shape of {k_name} {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != q.dtype:
        raise TypeError(f"{v_name}: expected dtype {q.dtype} like q, got {v.dtype}")


def _check_selection(idx, count, seq_lens, batch: int, window: int, block_size: int) -> None:
    """idx int32[B, W]: distinct history blocks in its first count[b] slots; count int32[B] in [0, W]."""
    _checks.check_tensor("idx", idx, 2, (torch.int32,), "int32[B, W]")
    if idx.shape[0] != batch:
        raise ValueError(f"idx: expected shape [B={batch}, W], got {tuple(idx.shape)}")
    _checks.check_tensor("count", count, 1, (torch.int32,), "int32[B]")
    if count.shape[0] != batch:
        raise ValueError(f"count: expected shape [B={batch}], got {tuple(count.shape)}")
    if not (_checks.values_checkable(idx) and _checks.values_checkable(count)) or batch == 0:
        return
    W = idx.shape[1]
    slot = torch.arange(W, device=idx.device)
    used = slot[None, :] < count[:, None].long()
    n_blocks = (seq_lens.long() - window + block_size - 1) // block_size  # history blocks per sequence
    keys = torch.where(used, idx.long(), -1 - slot[None, :]).sort(dim=1).values  # unused slots: distinct < 0
    flags = torch.stack([
        (count < 0) | (count > W),
        (used & (idx < 0)).any(1),
        (used & (idx >= n_blocks[:, None])).any(1),
        (keys[:, 1:] == keys[:, :-1]).any(1) if W > 1 else torch.zeros_like(count, dtype=torch.bool),
    ]).cpu()
    for check, problem in enumerate((
            f"count: expected values in [0, W={W}] (the width of idx), got {{}}",
            "idx: negative block index within count (-1 padding must come after count), got {}",
            "idx: block index past the history (blocks of block_size must start before ctx_len = seq_lens - T), got {}",
            "idx: the first count[b] blocks must be distinct, got a repeated block in {}")):
        bad = flags[check].nonzero().flatten().tolist()
        if bad:
            b = bad[0]
            what = (int(count[b]) if check == 0 else
                    f"sequence {b}: {idx[b, : max(0, min(W, int(count[b])))].tolist()} "
                    f"(count {int(count[b])}, history blocks {int(n_blocks[b])})")
            raise ValueError(problem.format(what))


def _check_flag(return_lse) -> None:
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")


def _check_cache_inputs(q, k_cache, v_cache, seq_lens, idx, count, block_size, scale) -> tuple[float, torch.device]:
    """Checks of `sparse_verify` (of `dense_verify` when idx is None); returns (scale, device)."""
    B, Hq, Hkv, T, D = _checks.check_qk(q, k_cache)
    _check_kv(q, k_cache, v_cache, "k_cache", "v_cache", "[B, Hkv, N_max, D]")
    _checks.check_power_of_two("block_size", block_size)
    scale = _checks.check_scale(scale, D)
    device = _checks.check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, idx=idx, count=count)
    _checks.check_seq_lens(seq_lens, B, T, k_cache.shape[2], device)
    if idx is not None or count is not None:
        _check_selection(idx, count, seq_lens, B, T, block_size)
    return scale, device


def _outputs(q, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, T, D] in q's dtype: `out` checked, or a new tensor; a new lse float32 [B, Hq, T])."""
    out = _checks.check_out(out, tuple(q.shape), q.dtype, q.device)
    return out, torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)


def sparse_verify(q, k_cache, v_cache, seq_lens, idx, count, *, block_size=1, scale=None,
                  return_lse=False, backend=None, out=None):
    """Attention of the T window queries over the selected history blocks plus the causal window.

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, N_max, D] (any strides, Hq = G * Hkv); seq_lens int32[B]
    (valid entries including the window); idx int32[B, W]: the first count[b] entries are distinct
    history blocks (block j = tokens [j * block_size, (j + 1) * block_size) below ctx_len = seq_lens - T),
    -1 padding after; count int32[B]. Returns out [B, Hq, T, D] in q's dtype (written into `out` when
    given: contiguous, that shape and dtype), and with return_lse=True also lse float32 [B, Hq, T]
    (natural-log log-sum-exp of the scaled scores). An inference op (no autograd): tensors that require
    grad are refused. Also `torch.ops.dustin_kernels.sparse_verify` (`dustin_kernels.library`); for every
    layer of a step, `VerifyPlan` checks and resolves once.

    CUDA graphs: the Triton path launches without host synchronisation and allocates per call only
    what shapes and the launch config determine (out, lse, and when num_splits > 1 the workspace of the
    partial results, [B*Hq*T, num_splits, D + 1] fp32 values, and B*Hkv zeroed int32 counters); value
    checks of seq_lens / idx / count read the tensors on the host and are skipped while a graph is being
    captured, so validate them before capturing.
    """
    _check_flag(return_lse)
    scale, device = _check_cache_inputs(q, k_cache, v_cache, seq_lens, idx, count, block_size, scale)
    out, lse = _outputs(q, out)
    _sparse_verify_into(q, k_cache, v_cache, seq_lens, idx, count, out, lse, block_size, scale,
                        dispatch.backend_for(backend, device))
    return (out, lse) if return_lse else out


def sparse_verify_paged(q, k_pages, v_pages, block_table, seq_lens, idx, count, *, block_size=1, scale=None,
                        return_lse=False, backend=None, out=None):
    """`sparse_verify` over a paged cache: k_pages, v_pages [num_pages, Hkv, page_size, D] (any strides;
    an NHD cache [num_pages, page_size, Hkv, D] is passed as `.transpose(1, 2)`); block_table
    int32[B, max_pages] maps logical page p of sequence b to a physical page. page_size is read from
    the pages' shape and is independent of block_size. Same results, `out`, CUDA-graph notes and refusal
    of tensors that require grad (an inference op) as `sparse_verify`.
    """
    _checks.check_tensor("q", q, 4, shape_doc="[B, Hq, T, D]")
    _checks.check_tensor("k_pages", k_pages, 4, shape_doc="[num_pages, Hkv, page_size, D]")
    B, Hq, T, D = q.shape
    num_pages, Hkv, page_size, _ = k_pages.shape
    if k_pages.shape[3] != D or Hkv == 0 or page_size == 0:
        raise ValueError(f"k_pages: expected shape [num_pages, Hkv, page_size, D={D}], got {tuple(k_pages.shape)}")
    if Hq % Hkv:
        raise ValueError(f"q: number of heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv} of k_pages")
    if k_pages.dtype != q.dtype:
        raise TypeError(f"k_pages: expected dtype {q.dtype} like q, got {k_pages.dtype}")
    if T < 1 or D < 1:
        raise ValueError(f"q: expected at least one query row and a head dim >= 1, got shape {tuple(q.shape)}")
    _check_kv(q, k_pages, v_pages, "k_pages", "v_pages", "[num_pages, Hkv, page_size, D]")
    _checks.check_tensor("block_table", block_table, 2, (torch.int32,), "int32[B, max_pages]")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table: expected shape [B={B}, max_pages], got {tuple(block_table.shape)}")
    _checks.check_power_of_two("block_size", block_size)
    scale = _checks.check_scale(scale, D)
    _check_flag(return_lse)
    device = _checks.check_same_device(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, idx=idx,
                                       count=count)
    _checks.check_seq_lens(seq_lens, B, T, block_table.shape[1] * page_size, device)
    if _checks.values_checkable(block_table) and B:
        pages = (seq_lens[:, None] + page_size - 1) // page_size  # pages holding each sequence
        needed = torch.arange(block_table.shape[1], device=device)[None, :] < pages
        bad = (needed & ((block_table < 0) | (block_table >= num_pages))).nonzero()
        if len(bad):
            b, p = bad[0].tolist()
            raise ValueError(f"block_table: expected page ids in [0, num_pages={num_pages}) for the pages that "
                             f"hold seq_lens[b] tokens, got {int(block_table[b, p])} at [{b}, {p}]")
    _check_selection(idx, count, seq_lens, B, T, block_size)
    out, lse = _outputs(q, out)
    _sparse_verify_paged_into(q, k_pages, v_pages, block_table, seq_lens, idx, count, out, lse, block_size, scale,
                              dispatch.backend_for(backend, device))
    return (out, lse) if return_lse else out


def dense_verify(q, k_cache, v_cache, seq_lens, *, scale=None, return_lse=False, backend=None, out=None):
    """Dense causal attention of the T window queries over every history token (the dense mode of the
    sparse kernel: the in-house dense baseline). Shapes, outputs, `out`, CUDA-graph notes and refusal of
    tensors that require grad (an inference op) as `sparse_verify`.
    """
    _check_flag(return_lse)
    scale, device = _check_cache_inputs(q, k_cache, v_cache, seq_lens, None, None, 1, scale)
    out, lse = _outputs(q, out)
    _dense_verify_into(q, k_cache, v_cache, seq_lens, out, lse, scale, dispatch.backend_for(backend, device))
    return (out, lse) if return_lse else out


class VerifyPlan:
    """`sparse_verify` (`dense_verify` when idx and count are None) of every layer of one step, FlashInfer's
    plan/run: made once per step, it checks the inputs, resolves the kernel and its launch config and
    allocates the output, lse and split-KV workspace; `run`, once per layer, only launches (no checks of
    values, no lookups, no allocation, no host sync: CUDA-graph capturable).

    q, k_cache, v_cache: one layer's tensors, as `sparse_verify` takes them; every layer's must have their
    shapes, dtype and device. seq_lens, idx, count, block_size, scale, backend: as `sparse_verify`, the
    same for every layer (the plan keeps the tensors: do not change them before the step's last run).
    Under torch.compile / torch.export call the ops instead (custom ops, `dustin_kernels.library`).
    """

    def __init__(self, q, k_cache, v_cache, seq_lens, idx=None, count=None, *, block_size=1, scale=None,
                 backend=None):
        if (idx is None) != (count is None):
            raise ValueError("idx, count: expected both (sparse verification) or neither (dense), got one")
        self.variant = "dense" if idx is None else ""
        self.block_size = block_size if idx is not None else 1
        self.scale, device = _check_cache_inputs(q, k_cache, v_cache, seq_lens, idx, count, block_size, scale)
        self.seq_lens, self.idx, self.count = (t if t is None else t.contiguous() for t in (seq_lens, idx, count))
        self.out, self.lse = _outputs(q, None)  # lse [B, Hq, T] of the last run
        triton = dispatch.backend_for(backend, device) == "triton"
        self._resolved = _resolve(q, k_cache, self.idx, block_size=self.block_size, variant=self.variant) \
            if triton else None

    def run(self, q, k_cache, v_cache, *, out=None) -> torch.Tensor:
        """out [B, Hq, T, D] of this layer: the plan's buffer (overwritten by the next run), or `out` (a
        contiguous tensor of that shape and q's dtype); `self.lse` holds its lse float32 [B, Hq, T]."""
        out = self.out if out is None else _checks.check_out(out, self.out.shape, self.out.dtype, self.out.device)
        _verify(q, k_cache, v_cache, self.seq_lens, self.idx, self.count, None, out, self.lse,
                block_size=self.block_size, scale=self.scale, variant=self.variant, resolved=self._resolved)
        return out


FAMILY = OpFamily("sparse_verify", launch, default_config, aot_launches, aot_kernels)
