"""attention_scores: causal softmax mass that selected heads' window queries put on each key block.

The README's first op. The draft-score reduction (draft lookahead, a few draft heads, T rows)
and the target estimation (a few target heads, one row) of Dustin. Two backends:

- torch: vectorised over batch and selected heads, two passes over key chunks (row log-sum-exp,
  then probabilities summed per key), memory bounded at 128K keys;
- triton (`templates/attention_scores.py.j2`): `row_lse` (split-K online softmax per row) then
  `block_scores` (recompute each key tile, sum exp(s - lse) over rows and per block). K is read
  twice, and the [rows, N] probability matrix is never stored; this op only runs on a few heads.

With the rows' log-sum-exp given (`attention_scores(lse=)`, `attention_scores_layers`: the draft
model's own attention returns it) the lse pass is skipped: the torch backend makes one pass over the
key chunks, and triton launches only `layer_scores` (the `layers<L>` spec variant), which reads each
layer's used keys once and sums over every layer's rows in one launch, `block_scores`' tile loop.

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
from ..family import AotKernel, OpFamily
from ..spec import DTYPE_NAMES, DTYPES, KernelSpec, Launch, next_pow2

LOG2E = math.log2(math.e)
_TORCH_CHUNK_ELEMENTS = 1 << 24  # fp32 scores / keys the torch backend holds per key chunk (64 MiB)


def launch(arch: str, dtype: str, *, batch: int, q_heads: int, kv_heads: int, window: int, head_dim: int,
           block_size: int, n_max: int, heads: tuple, layers: int = 0) -> Launch:
    """The `Launch` of a call (its spec and perf-DB key; its context is N_max, the lengths stay on the
    device). heads: the selected q-heads; with layers = L > 0 (`attention_scores_layers`, the lse given) a
    tuple of L such tuples. The spec's group is the most heads selected on one KV head (of any layer)."""
    group = max(len(row) - 1 for layer in (heads if layers else (heads,))
                for row in _head_layout(tuple(layer), q_heads // kv_heads))
    spec = KernelSpec("attention_scores", arch, dtype, head_dim=head_dim, group=group, window=window,
                      block_size=block_size, variant=f"layers{layers}" if layers else "")
    return Launch(spec, batch, n_max)


def default_config(launch: Launch) -> dict:
    """Launch config when the perf DB has no entry (checked with `python -m dustin_kernels.aot`); the
    launch's context is N_max.

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
    - variant "layers<L>" (layer_scores, the lse given): only BLOCK_N, num_warps and num_stages are read,
      the block_scores values above (grid B x cdiv(N_max, BLOCK_N), a loop over L x used KV heads per
      program; sm_90 / sm_80 at the 0.5B draft shape, 3 layers: 64 / 76 registers, no spills; num_stages 2
      double-buffers the keys across the used KV heads, untimed); the other keys keep the rule's values,
      so that the config stays within the search space.
    """
    spec, batch, context = launch.spec, launch.batch, launch.context
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


def _torch_attention_scores(q, k_cache, seq_lens, heads, block_size, scale, lse=None):
    """float32[B, ceil(N_max / block_size)]; lse: the rows' log-sum-exp float32 [B, Hq, T] (natural log), or
    None: computed here in a first pass over the keys."""
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

    if lse is None:
        # one matmul pass when all scores fit in a chunk's budget x 4 (the common case on CPU), else recompute
        kept = list(chunks()) if B * U * R * n_keys <= 4 * _TORCH_CHUNK_ELEMENTS else None
        lse = torch.full((B, U, R), -math.inf, device=q.device)
        for _, scores, visible in kept or chunks():
            lse = torch.logaddexp(lse, scores.masked_fill_(~visible, -math.inf).logsumexp(-1))
        lse = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]  # padding rows see no key
    else:
        kept = None
        lse = torch.where(valid, lse[:, slots.clamp(min=0)].reshape(B, U, R), 0.0)[..., None]
    n_out = math.ceil(N / block_size)
    mass = torch.zeros(B, n_out * block_size, device=q.device)
    for c0, scores, visible in kept or chunks():
        prob = torch.where(visible, (scores - lse).exp_(), 0.0)
        mass[:, c0:c0 + prob.shape[-1]] = prob.sum((1, 2))
    return mass.view(B, n_out, block_size).sum(-1)


def _check_whole_blocks(config: dict, names: tuple[str, ...], block_size: int) -> None:
    """Each tile of `names` (key counts) holds whole key blocks (ONE_PASS also sums blocks per row_lse tile)."""
    for name in names:
        if config[name] % block_size:
            raise ValueError(f"config: {name}={config[name]} must be a multiple of block_size={block_size}")


def _triton_attention_scores(q, k_cache, seq_lens, heads, block_size, scale, out=None):
    B, Hq, T, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    table = _head_table(heads, Hq // Hkv, q.device)
    n_used = table.shape[0]
    call = launch(dispatch.arch_for(q.device), DTYPE_NAMES[q.dtype], batch=B, q_heads=Hq, kv_heads=Hkv, window=T,
                  head_dim=D, block_size=block_size, n_max=N, heads=heads)
    mod = codegen.load(call.spec)
    config = dispatch.config_for(call, default_config, q.device)
    splits, block_n, lse_block_n, one_pass = (config[k] for k in ("NUM_SPLITS", "BLOCK_N", "LSE_BLOCK_N", "ONE_PASS"))
    _check_whole_blocks(config, ("BLOCK_N", "LSE_BLOCK_N") if one_pass else ("BLOCK_N",), block_size)
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


@functools.lru_cache(maxsize=256)
def _layers_table(heads: tuple[tuple[int, ...], ...], group: int, device: torch.device) -> torch.Tensor:
    """int32 [L, used KV heads, 1 + selected heads per KV head]: each layer's `_head_layout`, padded to the
    most used KV heads of any layer (rows of KV head -1) and the most selected heads of any KV head (-1)."""
    layouts = [_head_layout(h, group) for h in heads]
    width = max(len(row) for rows in layouts for row in rows)
    used = max(len(rows) for rows in layouts)
    padded = [[(*row, *[-1] * (width - len(row))) for row in rows] + [(-1,) * width] * (used - len(rows))
              for rows in layouts]
    return torch.tensor(padded, dtype=torch.int32, device=device)


def _triton_attention_scores_layers(qs, k_caches, lses, seq_lens, heads, block_size, scale, out):
    """One `layer_scores` launch over every layer (heads: per layer, none empty) into out."""
    B, Hq, T, D = qs[0].shape
    Hkv, N = k_caches[0].shape[1], k_caches[0].shape[2]
    table = _layers_table(heads, Hq // Hkv, qs[0].device)
    n_layers, n_used, width = table.shape
    call = launch(dispatch.arch_for(qs[0].device), DTYPE_NAMES[qs[0].dtype], batch=B, q_heads=Hq, kv_heads=Hkv,
                  window=T, head_dim=D, block_size=block_size, n_max=N, heads=heads, layers=n_layers)
    mod = codegen.load(call.spec)
    config = dispatch.config_for(call, default_config, qs[0].device)
    _check_whole_blocks(config, ("BLOCK_N",), block_size)
    per_layer = [x for q, k, lse in zip(qs, k_caches, lses)  # the template's per-layer argument group
                 for x in (q, k, lse, *q.stride(), *k.stride(), *lse.stride())]
    mod.layer_scores[(B, math.ceil(N / config["BLOCK_N"]))](
        *per_layer, seq_lens.contiguous(), table, out, out.shape[1], out.stride(0), scale * LOG2E, N_USED=n_used,
        BLOCK_N=config["BLOCK_N"], num_warps=config["num_warps"], num_stages=config["num_stages"])
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


@library.custom_op("attention_scores_layers", mutates_args=("out",))
def _attention_scores_layers_into(qs: list[torch.Tensor], k_caches: list[torch.Tensor], lses: list[torch.Tensor],
                                  seq_lens: torch.Tensor, out: torch.Tensor, heads: list[int], layer_heads: list[int],
                                  block_size: int, scale: float, backend: str) -> None:
    """Unchecked `attention_scores_layers` (also `attention_scores` with a given lse: one layer) into out
    float32[B, ceil(N_max / block_size)] (contiguous). heads: every layer's q-heads, one layer after the
    other; layer_heads: how many of them belong to each layer (a custom op takes no nested lists)."""
    starts = [sum(layer_heads[:i]) for i in range(len(layer_heads))]
    layers = [(q, k, lse, tuple(heads[i:i + n])) for q, k, lse, i, n in zip(qs, k_caches, lses, starts, layer_heads)
              if n]  # a layer without heads adds nothing
    if not layers or not out.shape[0]:
        out.zero_()
    elif backend == "triton":
        qs, k_caches, lses, heads = zip(*layers)
        _triton_attention_scores_layers(qs, k_caches, lses, seq_lens, heads, block_size, scale, out)
    else:
        out.zero_()
        for q, k, lse, h in layers:
            out.add_(_torch_attention_scores(q, k, seq_lens, h, block_size, scale, lse))


def aot_launches(arch: str) -> list[Launch]:
    """bf16 model shapes (`shapes.PRESETS` plus head dims 80, 96, 256 at G 8): one row of one head per
    KV head (target estimation), all heads at T 5 and at T 16 with block size 128; fp32 at D 128. The
    given-lse kernel (layer_scores): one layer with all heads at T 5, and 3 layers of 4 retrieval heads
    at T 5 (all on one KV head, and spread over two: the Qwen2.5-0.5B draft lookahead, D 64 G 2).
    Batch 16, N_max 32K."""
    from ..shapes import PRESETS

    shapes = {(s.head_dim, s.group) for s in PRESETS.values()} | {(80, 8), (96, 8), (256, 8)}
    specs = {KernelSpec("attention_scores", arch, "bf16", d, 1, 1, 1) for d, _ in shapes}
    for d, g in shapes:
        specs |= {KernelSpec("attention_scores", arch, "bf16", d, g, 5, 1),
                  KernelSpec("attention_scores", arch, "bf16", d, g, 16, 128),
                  KernelSpec("attention_scores", arch, "bf16", d, g, 5, 1, "layers1"),
                  KernelSpec("attention_scores", arch, "bf16", d, min(g, 4), 5, 1, "layers3")}
    specs |= {KernelSpec("attention_scores", arch, "fp32", 128, 1, 1, 1),
              KernelSpec("attention_scores", arch, "fp32", 128, 4, 5, 16),
              KernelSpec("attention_scores", arch, "bf16", 64, 2, 5, 1, "layers3"),
              KernelSpec("attention_scores", arch, "bf16", 64, 2, 5, 16, "layers3"),
              KernelSpec("attention_scores", arch, "fp32", 128, 4, 5, 16, "layers3")}
    return [Launch(spec, 16, 32768) for spec in sorted(specs, key=KernelSpec.uri)]


def aot_kernels(spec: KernelSpec, config: dict) -> list:
    """row_lse and block_scores of `spec` (a "layers<L>" variant: layer_scores) with their argument types, for
    `dustin_kernels.aot`.

    The head dim and the lse's T dim are taken contiguous (Triton specialises a unit stride to a constexpr
    at run time) and the q / K row strides multiples of 16; block_scores and layer_scores are compiled for
    2 used KV heads."""
    mod = codegen.load(spec)
    ptr = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}[spec.dtype]
    types = {"q_ptr": ptr, "k_ptr": ptr, "seq_lens_ptr": "*i32", "table_ptr": "*i32", "m_ptr": "*fp32",
             "l_ptr": "*fp32", "p_ptr": "*fp32", "mt_ptr": "*fp32", "out_ptr": "*fp32", "qk_scale": "fp32"}
    rows = ("stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kn")
    if spec.variant.startswith("layers"):
        layers = range(int(spec.variant[len("layers"):]))
        types |= {f"{x}{i}_ptr": ptr for i in layers for x in "qk"} | {f"lse{i}_ptr": "*fp32" for i in layers}
        unit = {f"stride_{x}{i}{dim}": 1 for i in layers for x, dim in (("q", "d"), ("k", "d"), ("lse", "t"))}
        kernels = ((mod.layer_scores, {**unit, "BLOCK_N": config["BLOCK_N"], "N_USED": 2}, "num_warps", "num_stages"),)
        rows = tuple(f"stride_{x}{i}{dim}" for i in layers for x in "qk" for dim in ("bht" if x == "q" else "bhn"))
    else:
        common = {"stride_qd": 1, "stride_kd": 1, "NUM_SPLITS": config["NUM_SPLITS"],
                  "ONE_PASS": bool(config["ONE_PASS"])}
        kernels = ((mod.row_lse, {**common, "BLOCK_N": config["LSE_BLOCK_N"]}, "lse_num_warps", "lse_num_stages"),
                   (mod.block_scores, {**common, "BLOCK_N": config["BLOCK_N"], "N_USED": 2,
                                       "LSE_BLOCK_N": config["LSE_BLOCK_N"]}, "num_warps", "num_stages"))
    return [AotKernel.of(fn, types, constexprs, config[warps], config[stages], rows)
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


def _check_lse(name: str, lse, shape: tuple, device: torch.device, heads: tuple[int, ...]) -> None:
    """lse: float32 [B, Hq, T] on `device`, finite on the selected heads where values can be read."""
    _checks.check_tensor(name, lse, 3, (torch.float32,), "float32[B, Hq, T]")
    if tuple(lse.shape) != shape:
        raise ValueError(f"{name}: expected shape [B={shape[0]}, Hq={shape[1]}, T={shape[2]}] (each row's "
                         f"log-sum-exp, indexed by q-head like q), got {tuple(lse.shape)}")
    if lse.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} like the other inputs, got {lse.device}")
    if heads and _checks.values_checkable(lse) and not torch.isfinite(lse[:, list(heads)]).all():
        raise ValueError(f"{name}: expected finite values on the selected heads {list(heads)} (each row sees at "
                         "least one key), got inf or NaN")


def attention_scores(q, k_cache, seq_lens, *, heads=None, block_size=1, scale=None, backend=None, out=None,
                     lse=None):
    """Causal softmax mass per key block of the window queries, summed over `heads` and rows.

    q: [B, Hq, T, D], k_cache: [B, Hkv, N_max, D] (Hq = G * Hkv, any strides, same fp16/bf16/fp32
    dtype), seq_lens: int32[B] in [T, N_max], including the window; window query t sits at
    p_t = seq_lens[b] - T + t and sees keys [0, p_t]. heads: distinct q-head indices (None = all; an
    empty list gives zeros: a tensor-parallel rank that holds no retrieval head, `dustin_kernels.
    distributed`). block_size: power of two in [1, 128]. scale: softmax scale (None = 1/sqrt(D)).
    lse: None, or each row's log-sum-exp, float32 [B, Hq, T] (any strides) indexed by q-head like q:
    the natural log of sum over keys [0, p_t] of exp(scale * q.k), as `dense_verify(..., return_lse=True)`
    returns it from the model's own attention; only the selected heads are read. Given, the op skips its
    own log-sum-exp pass and reads K once in one launch (`attention_scores_layers` with one layer).
    Returns float32[B, ceil(N_max / block_size)], zero past seq_lens; each sequence sums to
    len(heads) * T (with a given lse: as far as that lse is the rows' own); written into `out` when
    given (a contiguous float32 tensor of that shape). An inference op (no autograd): tensors that
    require grad are refused. Also `torch.ops.dustin_kernels.attention_scores` (lse None) and
    `torch.ops.dustin_kernels.attention_scores_layers` (`dustin_kernels.library`).
    """
    B, Hq, Hkv, T, D = _checks.check_qk(q, k_cache)
    device = _checks.check_same_device(q=q, k_cache=k_cache)
    _checks.check_seq_lens(seq_lens, B, T, k_cache.shape[2], device)
    _checks.check_power_of_two("block_size", block_size, 128)
    scale = _checks.check_scale(scale, D)
    heads = _check_heads(heads, Hq)
    if lse is not None:
        _check_lse("lse", lse, (B, Hq, T), device, heads)
    backend = dispatch.backend_for(backend, device)
    out = _checks.check_out(out, (B, (k_cache.shape[2] + block_size - 1) // block_size), torch.float32, device)
    if lse is None:
        _attention_scores_into(q, k_cache, seq_lens, out, list(heads), block_size, scale, backend)
    else:
        _attention_scores_layers_into([q], [k_cache], [lse], seq_lens, out, list(heads), [len(heads)], block_size,
                                      scale, backend)
    return out


MAX_LAYERS = 8  # layers per attention_scores_layers launch (each is a group of kernel arguments)


def _layer_list(name: str, value, n_layers: int | None = None) -> list:
    """`value` as a list of per-layer items: a list or tuple, 1..MAX_LAYERS long (n_layers long when given)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list with one entry per layer, got {type(value).__name__}")
    if n_layers is None and not 1 <= len(value) <= MAX_LAYERS:
        raise ValueError(f"{name}: expected 1 to {MAX_LAYERS} layers, got {len(value)}")
    if n_layers is not None and len(value) != n_layers:
        raise ValueError(f"{name}: expected one entry per layer of qs ({n_layers}), got {len(value)}")
    return list(value)


def _renamed(names: dict, check, *args):
    """`check(*args)`, its error message naming the argument as `names` maps it (q -> qs[1], ...)."""
    try:
        return check(*args)
    except (TypeError, ValueError) as exc:
        name, _, rest = str(exc).partition(": ")
        raise type(exc)(f"{names.get(name, name)}: {rest}") from None


def attention_scores_layers(qs, k_caches, seq_lens, *, heads, lses, block_size=1, scale=None, backend=None,
                            out=None):
    """`attention_scores` of several layers with given log-sum-exps, summed, in one launch.

    qs: per layer q [B, Hq, T, D]; k_caches: per layer k_cache [B, Hkv, N_max, D] (one tensor per layer,
    as the models keep them: nothing is stacked or copied; any strides); heads: per layer its distinct
    q-head indices (None = all, [] = none); lses: per layer float32 [B, Hq, T], the rows' natural-log
    log-sum-exp as `attention_scores(lse=)` takes it. Lists of 1 to MAX_LAYERS (8) entries; every
    layer has the same shapes and dtype. seq_lens, block_size, scale (one for all layers), backend and
    out as `attention_scores`. Returns float32[B, ceil(N_max / block_size)] = the sum over layers l of
    attention_scores(qs[l], k_caches[l], seq_lens, heads=heads[l], lse=lses[l], ...); one kernel
    launch (triton) reads each used KV head's keys once per layer. Also
    `torch.ops.dustin_kernels.attention_scores_layers`.
    """
    qs = _layer_list("qs", qs)
    n_layers = len(qs)
    k_caches = _layer_list("k_caches", k_caches, n_layers)
    heads = _layer_list("heads", heads, n_layers)
    lses = _layer_list("lses", lses, n_layers)
    B, Hq, Hkv, T, D = _renamed({"q": "qs[0]", "k_cache": "k_caches[0]"}, _checks.check_qk, qs[0], k_caches[0])
    for name, layers in (("qs", qs), ("k_caches", k_caches)):
        for i, t in enumerate(layers[1:], 1):
            _checks.check_tensor(f"{name}[{i}]", t, 4)
            if t.shape != layers[0].shape or t.dtype != layers[0].dtype:
                raise ValueError(f"{name}[{i}]: expected shape {list(layers[0].shape)} and dtype {layers[0].dtype} "
                                 f"like {name}[0], got {list(t.shape)} {t.dtype}")
    device = _checks.check_same_device(**{f"{name}[{i}]": t for name, layers in (("qs", qs), ("k_caches", k_caches))
                                          for i, t in enumerate(layers)})
    _checks.check_seq_lens(seq_lens, B, T, k_caches[0].shape[2], device)
    _checks.check_power_of_two("block_size", block_size, 128)
    scale = _checks.check_scale(scale, D)
    heads = [_renamed({"heads": f"heads[{i}]"}, _check_heads, h, Hq) for i, h in enumerate(heads)]
    for i, (lse, h) in enumerate(zip(lses, heads)):
        _check_lse(f"lses[{i}]", lse, (B, Hq, T), device, h)
    backend = dispatch.backend_for(backend, device)
    out = _checks.check_out(out, (B, (k_caches[0].shape[2] + block_size - 1) // block_size), torch.float32, device)
    _attention_scores_layers_into(qs, k_caches, lses, seq_lens, out, [h for hs in heads for h in hs],
                                  [len(hs) for hs in heads], block_size, scale, backend)
    return out


FAMILY = OpFamily("attention_scores", launch, default_config, aot_launches, aot_kernels)
