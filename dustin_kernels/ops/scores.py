"""attention_scores: causal softmax mass that selected heads' window queries put on each key block.

The README's first op. The draft-score reduction (draft lookahead, a few draft heads, T rows)
and the target estimation (a few target heads, one row) of Dustin. Two backends:

- torch: vectorised over batch and selected heads, two passes over key chunks (row log-sum-exp,
  then probabilities summed per key), memory bounded at 128K keys;
- triton (`templates/attention_scores.py.j2`): `row_lse` (split-K online softmax per row) then
  `block_scores` (recompute each key tile, sum exp(s - lse) over rows and per block). K is read
  twice, and the [rows, N] probability matrix is never stored; this op only runs on a few heads.

The selected q-heads are grouped by KV head (rows of one KV head share its keys): GROUP, the most
selected heads of any KV head, and T are template constants. fp32 inputs use tf32x3 dots (tensor
cores at about fp32 accuracy); on sm90 `block_scores` puts the keys on the MMA's M side (wgmma).
"""
from __future__ import annotations

import functools
import math
import operator

import torch

from .. import _checks, codegen, dispatch, library
from ..spec import DTYPE_NAMES, DTYPES, KernelSpec, next_pow2

LOG2E = math.log2(math.e)
_TORCH_CHUNK_ELEMENTS = 1 << 24  # fp32 scores / keys the torch backend holds per key chunk (64 MiB)


def default_config(spec: KernelSpec, *, batch: int, context: int) -> dict:
    """Launch config when the perf DB has no entry (checked with `python -m dustin_kernels.aot`).

    rows = next_pow2(group * T), at least 16; D = next_pow2(head_dim).
    - interpreter: LSE_BLOCK_N 32, NUM_SPLITS 2, BLOCK_N max(32, block_size), so that the tests
      run several splits and tiles;
    - NUM_SPLITS (power of two): next_pow2(256 / batch), so that batch x splits fills about two waves
      of an H100/H200, at most 16 (block_scores combines every split of every row), halved until
      each split has at least 4 key tiles of the context;
    - row_lse: LSE_BLOCK_N 64, lse_num_warps 4 (8 when rows * D > 32 * 128), lse_num_stages 3
      (2 when D >= 256); fp32 (a tf32x3 dot, twice the operand registers): LSE_BLOCK_N 16, 4 warps, 2 stages;
    - block_scores: BLOCK_N max(64, block_size) (fp32: max(32, block_size)), num_warps 8,
      num_stages 1 (its loop runs over the few used KV heads; nothing to pipeline);
    - ONE_PASS 1 (row_lse also stores each row's per-block sums, block_scores rescales them instead of
      reading K again) where that moves fewer bytes, G*T * 8 / block_size < head_dim * itemsize, and
      LSE_BLOCK_N holds whole blocks; else 0. Measured on an H200 (Qwen2.5-72B estimate, batch 16,
      8K-32K, the default config with ONE_PASS 0 / 1, tools/results/h200-session2): 107 / 69 us to
      350 / 177 us; the Qwen2.5-0.5B lookahead at 32K: 126.5 / 97.8 us.
    """
    if spec.arch == "interp":
        config = {"LSE_BLOCK_N": 32, "NUM_SPLITS": 2, "lse_num_warps": 4, "lse_num_stages": 1,
                  "BLOCK_N": max(32, spec.block_size), "num_warps": 4, "num_stages": 1}
        return config | {"ONE_PASS": _one_pass_pays(spec, config["LSE_BLOCK_N"])}
    rows = max(16, next_pow2(spec.group * spec.window))
    block_d = next_pow2(spec.head_dim)
    fp32 = spec.dtype == "fp32"
    lse_block_n = 16 if fp32 else 64
    splits = min(next_pow2(math.ceil(256 / max(batch, 1))), 16)
    while splits > 1 and splits * 4 * lse_block_n > context:
        splits //= 2
    return {"LSE_BLOCK_N": lse_block_n, "NUM_SPLITS": splits,
            "lse_num_warps": 8 if rows * block_d > 32 * 128 and not fp32 else 4,
            "lse_num_stages": 2 if fp32 or block_d >= 256 else 3,
            "BLOCK_N": max(32 if fp32 else 64, spec.block_size), "num_warps": 8, "num_stages": 1,
            "ONE_PASS": _one_pass_pays(spec, lse_block_n)}


def _one_pass_pays(spec: KernelSpec, lse_block_n: int) -> int:
    """1 where ONE_PASS's stored sums (8 bytes per row and block) cost less than reading K again."""
    fewer_bytes = spec.group * spec.window * 8 < spec.block_size * spec.head_dim * DTYPES[spec.dtype].itemsize
    return int(fewer_bytes and lse_block_n % spec.block_size == 0)


@functools.lru_cache(maxsize=256)
def _head_layout(heads: tuple[int, ...], group: int) -> tuple[tuple[int, ...], ...]:
    """Rows (KV head, its selected q-heads..., -1 padded), one per used KV head, in order of first use."""
    by_kv: dict[int, list[int]] = {}
    for h in heads:
        by_kv.setdefault(h // group, []).append(h)
    width = max(len(v) for v in by_kv.values())
    return tuple((kv, *hs, *[-1] * (width - len(hs))) for kv, hs in by_kv.items())


@functools.lru_cache(maxsize=256)
def _head_table(heads: tuple[int, ...], group: int, device: torch.device) -> torch.Tensor:
    """int32 [used KV heads, 1 + selected heads per KV head] on `device` (see `_head_layout`)."""
    return torch.tensor(_head_layout(heads, group), dtype=torch.int32, device=device)


def _torch_attention_scores(q, k_cache, seq_lens, heads, block_size, scale):
    B, Hq, T, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    table = _head_table(heads, Hq // Hkv, q.device).long()
    kv_heads = [row[0] for row in _head_layout(heads, Hq // Hkv)]  # host ints, no device sync
    slots = table[:, 1:]  # [U, S]
    U, S = slots.shape
    R = S * T
    rows_q = q[:, slots.clamp(min=0)].float().mul_(scale).reshape(B, U, R, D)  # rows (slot, t)
    valid = (slots >= 0).repeat_interleave(T, dim=1)  # [U, R]
    pos = seq_lens.long()[:, None, None] - T + torch.arange(T, device=q.device).repeat(S)  # [B, 1, R]
    pos = torch.where(valid, pos, -1)[..., None]  # [B, U, R, 1]: row sees keys [0, pos]
    n_keys = int(seq_lens.max()) if _checks.values_checkable(seq_lens) else N
    chunk = max(128, _TORCH_CHUNK_ELEMENTS // (B * U * max(R, D, 1)))

    def chunks():
        for c0 in range(0, n_keys, chunk):
            c1 = min(c0 + chunk, n_keys)
            # one matmul per used KV head on a view of the cache: gathering the heads would copy the keys
            scores = torch.stack([rows_q[:, u] @ k_cache[:, h, c0:c1].float().transpose(-1, -2)
                                  for u, h in enumerate(kv_heads)], 1)  # [B, U, R, C]
            yield c0, scores, torch.arange(c0, c1, device=q.device) <= pos

    # one matmul pass when all scores fit in a chunk's budget x 4 (the common case on CPU), else recompute
    kept = list(chunks()) if B * U * R * n_keys <= 4 * _TORCH_CHUNK_ELEMENTS else None
    lse = torch.full((B, U, R), -math.inf, device=q.device)
    for _, scores, visible in kept or chunks():
        lse = torch.logaddexp(lse, scores.masked_fill_(~visible, -math.inf).logsumexp(-1))
    lse = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]  # padding rows see no key
    n_out = math.ceil(N / block_size)
    mass = torch.zeros(B, n_out * block_size, device=q.device)
    for c0, scores, visible in kept or chunks():
        prob = torch.where(visible, (scores - lse).exp_(), 0.0)
        mass[:, c0:c0 + prob.shape[-1]] = prob.sum((1, 2))
    return mass.view(B, n_out, block_size).sum(-1)


def _triton_attention_scores(q, k_cache, seq_lens, heads, block_size, scale, out=None):
    B, Hq, T, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    table = _head_table(heads, Hq // Hkv, q.device)
    n_used = table.shape[0]
    spec = KernelSpec(kernel="attention_scores", arch=dispatch.arch_for(q.device), dtype=DTYPE_NAMES[q.dtype],
                      head_dim=D, group=table.shape[1] - 1, window=T, block_size=block_size)
    mod = codegen.load(spec)
    config = dispatch.config_for(spec, B, N, default_config, q.device)  # context: N_max (lengths stay on device)
    splits, block_n, lse_block_n, one_pass = (config[k] for k in ("NUM_SPLITS", "BLOCK_N", "LSE_BLOCK_N", "ONE_PASS"))
    for name in ("BLOCK_N", "LSE_BLOCK_N") if one_pass else ("BLOCK_N",):  # ONE_PASS sums blocks per row_lse tile
        if config[name] % block_size:
            raise ValueError(f"config: {name}={config[name]} must be a multiple of block_size={block_size}")
    partial_m = torch.empty(B, n_used, splits, mod.BLOCK_R.value, dtype=torch.float32, device=q.device)
    partial_l = torch.empty_like(partial_m)
    n_out = math.ceil(N / block_size)
    n_tiles = math.ceil(N / lse_block_n)
    if one_pass:  # per-block sums of each row, and each row's max per row_lse tile
        sums = torch.empty(B, n_used, mod.ROWS.value, n_out, dtype=torch.float32, device=q.device)
        tile_max = torch.empty(B, n_used, n_tiles, mod.BLOCK_R.value, dtype=torch.float32, device=q.device)
    else:
        sums = tile_max = partial_m  # not read
    out = torch.empty(B, n_out, dtype=torch.float32, device=q.device) if out is None else out
    strides = (*q.stride(), *k_cache.stride())
    qk_scale = scale * LOG2E
    seq_lens = seq_lens.contiguous()
    mod.row_lse[(B, n_used, splits)](
        q, k_cache, seq_lens, table, partial_m, partial_l, sums, tile_max, n_out, n_tiles, *strides, qk_scale,
        BLOCK_N=lse_block_n, NUM_SPLITS=splits, ONE_PASS=bool(one_pass),
        num_warps=config["lse_num_warps"], num_stages=config["lse_num_stages"])
    mod.block_scores[(B, math.ceil(N / block_n))](
        q, k_cache, seq_lens, table, partial_m, partial_l, sums, tile_max, out, n_out, n_tiles, *strides,
        out.stride(0), qk_scale, N_USED=n_used, BLOCK_N=block_n, NUM_SPLITS=splits, ONE_PASS=bool(one_pass),
        LSE_BLOCK_N=lse_block_n, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


@library.custom_op("attention_scores", mutates_args=("out",))
def _attention_scores_into(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                           heads: list[int], block_size: int, scale: float, backend: str) -> None:
    """Unchecked `attention_scores` into out float32[B, ceil(N_max / block_size)] (contiguous)."""
    if not heads or not q.shape[0]:
        out.zero_()
    elif backend == "triton":
        _triton_attention_scores(q, k_cache, seq_lens, tuple(heads), block_size, scale, out)
    else:
        out.copy_(_torch_attention_scores(q, k_cache, seq_lens, tuple(heads), block_size, scale))


def aot_specs(arch: str) -> list[KernelSpec]:
    """bf16 model shapes (`shapes.PRESETS` plus head dims 80, 96, 256 at G 8): one row of one head per
    KV head (target estimation), all heads at T 5 and at T 16 with block size 128; fp32 at D 128."""
    from ..shapes import PRESETS

    shapes = {(s.head_dim, s.group) for s in PRESETS.values()} | {(80, 8), (96, 8), (256, 8)}
    specs = {KernelSpec("attention_scores", arch, "bf16", d, 1, 1, 1) for d, _ in shapes}
    for d, g in shapes:
        specs |= {KernelSpec("attention_scores", arch, "bf16", d, g, 5, 1),
                  KernelSpec("attention_scores", arch, "bf16", d, g, 16, 128)}
    specs |= {KernelSpec("attention_scores", arch, "fp32", 128, 1, 1, 1),
              KernelSpec("attention_scores", arch, "fp32", 128, 4, 5, 16)}
    return sorted(specs, key=KernelSpec.uri)


def aot_kernels(spec: KernelSpec, config: dict) -> list:
    """row_lse and block_scores of `spec` with their argument types, for `dustin_kernels.aot`.

    The head dim is taken contiguous (Triton specialises a unit stride to a constexpr at run time) and
    the row strides multiples of 16; block_scores is compiled for 2 used KV heads."""
    from ..aot import AotKernel

    mod = codegen.load(spec)
    ptr = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}[spec.dtype]
    types = {"q_ptr": ptr, "k_ptr": ptr, "seq_lens_ptr": "*i32", "table_ptr": "*i32", "m_ptr": "*fp32",
             "l_ptr": "*fp32", "p_ptr": "*fp32", "mt_ptr": "*fp32", "out_ptr": "*fp32", "qk_scale": "fp32"}
    rows = ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kn")
    common = {"stride_qd": 1, "stride_kd": 1, "NUM_SPLITS": config["NUM_SPLITS"], "ONE_PASS": bool(config["ONE_PASS"])}
    kernels = ((mod.row_lse, {**common, "BLOCK_N": config["LSE_BLOCK_N"]}, "lse_num_warps", "lse_num_stages"),
               (mod.block_scores, {**common, "BLOCK_N": config["BLOCK_N"], "N_USED": 2,
                                   "LSE_BLOCK_N": config["LSE_BLOCK_N"]}, "num_warps", "num_stages"))
    return [AotKernel(fn, {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names},
                      constexprs, config[warps], config[stages], aligned=rows)
            for fn, constexprs, warps, stages in kernels]


def _check_heads(heads, n_q_heads: int) -> tuple[int, ...]:
    """`heads` as a tuple of distinct q-head indices in [0, n_q_heads) (None: all of them)."""
    if heads is None:
        if not n_q_heads:
            raise ValueError("q: expected at least one head (Hq >= 1)")
        return tuple(range(n_q_heads))
    if isinstance(heads, (str, bytes, torch.Tensor)) or not hasattr(heads, "__iter__"):
        raise TypeError(f"heads: expected None or a Python sequence of q-head indices (a tensor: use .tolist()), "
                        f"got {type(heads).__name__}")
    out = []
    for h in heads:
        if isinstance(h, bool):
            raise TypeError(f"heads: expected int q-head indices, got {h!r}")
        try:
            out.append(operator.index(h))
        except TypeError:
            raise TypeError(f"heads: expected int q-head indices, got {h!r}") from None
    bad = [h for h in out if not 0 <= h < n_q_heads]
    if bad:
        raise ValueError(f"heads: expected q-head indices in [0, {n_q_heads}), got {bad}")
    if len(set(out)) != len(out):
        raise ValueError(f"heads: expected distinct q-head indices, got duplicates in {out}")
    return tuple(out)


def attention_scores(q, k_cache, seq_lens, *, heads=None, block_size=1, scale=None, backend=None, out=None):
    """Causal softmax mass per key block of the window queries, summed over `heads` and rows.

    q: [B, Hq, T, D], k_cache: [B, Hkv, N_max, D] (Hq = G * Hkv, any strides, same fp16/bf16/fp32
    dtype), seq_lens: int32[B] in [T, N_max], including the window; window query t sits at
    p_t = seq_lens[b] - T + t and sees keys [0, p_t]. heads: distinct q-head indices (None = all; an
    empty list gives zeros: a tensor-parallel rank that holds no retrieval head, `dustin_kernels.
    distributed`). block_size: power of two in [1, 128]. scale: softmax scale (None = 1/sqrt(D)).
    Returns float32[B, ceil(N_max / block_size)], zero past seq_lens; each sequence sums to
    len(heads) * T; written into `out` when given (a contiguous float32 tensor of that shape). An inference
    op (no autograd): tensors that require grad are refused. Also `torch.ops.dustin_kernels.attention_scores`
    (`dustin_kernels.library`).
    """
    B, Hq, Hkv, T, D = _checks.check_qk(q, k_cache)
    device = _checks.check_same_device(q=q, k_cache=k_cache)
    _checks.check_seq_lens(seq_lens, B, T, k_cache.shape[2], device)
    _checks.check_power_of_two("block_size", block_size, 128)
    scale = _checks.check_scale(scale, D)
    heads = _check_heads(heads, Hq)
    backend = dispatch.backend_for(backend, device)
    out = _checks.check_out(out, (B, (k_cache.shape[2] + block_size - 1) // block_size), torch.float32, device)
    _attention_scores_into(q, k_cache, seq_lens, out, list(heads), block_size, scale, backend)
    return out
