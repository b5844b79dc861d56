"""The problems the tuner times: each kernel's public op on synthetic inputs of a model shape.

A `Workload` names one op call (DB entries store its fields, so `tools/perf_check.py` rebuilds the
same problem). `context` is the history per sequence (ctx_len); every sequence is full length:

- estimate  attention_scores of one query row (the target's last committed query) on `heads`
            retrieval heads spread over the KV heads; N_max = context + 1;
- lookahead attention_scores_layers of the T window rows on `heads` heads of LOOKAHEAD_LAYERS draft
            layers (one layer's q, K and lse passed for each: the same bytes from memory), the rows'
            log-sum-exp given, as the draft's own attention returns it (the workload's shape is the
            draft's, e.g. qwen2.5-0.5b); N_max = context + T;
- select    select_tokens of random draft and target block scores, m = budget // 4, sink 4, recent 16;
- sparse    sparse_verify of the T window queries over `budget` random distinct history blocks;
- dense     dense_verify over the whole history (the in-house dense baseline).

`Workload.launch` gives the `Launch` (spec, batch, context, KV heads: the DB key) that the op's
launcher passes to `dispatch.config_for`, from the op's own `launch` function; the tuner still checks
it against the recorded call.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..measurement import scores_bytes, select_bytes, used_kv_heads, verify_bytes
from ..shapes import spread_heads
from ..spec import DTYPES, Launch

KERNEL_OF = {"estimate": "attention_scores", "lookahead": "attention_scores", "select": "select_tokens",
             "sparse": "sparse_verify", "dense": "sparse_verify"}
SINK, RECENT = 4, 16
LOOKAHEAD_LAYERS = 3  # the paper's draft retrieval layers (Qwen2.5-0.5B: 3 layers x 4 heads)
# (atol, rtol) of the correctness check against the float64 reference, per input dtype; it rejects
# broken configs, it is not a precision test (tests/ holds those)
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (4e-3, 4e-3), "bf16": (2e-2, 2e-2)}
SCORES_TOLERANCE = (1e-4, 1e-3)  # fp32 outputs (probability mass per block)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str  # one of KERNEL_OF
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    window: int  # T of the verification step
    block_size: int
    batch: int
    context: int  # history tokens per sequence
    budget: int = 512  # blocks (select, sparse)
    heads: int = 4  # retrieval heads (estimate, lookahead)

    def __post_init__(self):
        if self.name not in KERNEL_OF:
            raise ValueError(f"workload: expected one of {sorted(KERNEL_OF)}, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"shape: q_heads {self.q_heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.name in ("select", "sparse") and self.budget < SINK + RECENT:
            raise ValueError(f"budget: expected at least sink + recent = {SINK + RECENT} blocks, got {self.budget}")

    @property
    def kernel(self) -> str:
        return KERNEL_OF[self.name]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "Workload":
        return cls(**{f.name: doc[f.name] for f in dataclasses.fields(cls) if f.name in doc})

    def label(self) -> str:
        return (f"{self.name} Hq{self.q_heads}/Hkv{self.kv_heads} D{self.head_dim} {self.dtype} T{self.window} "
                f"bs{self.block_size} B{self.batch} ctx{self.context}"
                + (f" budget{self.budget}" if self.name in ("select", "sparse") else "")
                + (f" heads{self.heads}" if self.name in ("estimate", "lookahead") else ""))

    # --- derived sizes ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Query rows per head of the op: 1 (estimate), else T."""
        return 1 if self.name == "estimate" else self.window

    @property
    def score_heads(self) -> tuple[int, ...]:
        return spread_heads(self.q_heads, self.heads)

    @property
    def n_max(self) -> int:
        return self.context + self.rows

    @property
    def history_blocks(self) -> int:
        return math.ceil(self.context / self.block_size)

    def launch(self, arch: str) -> Launch:
        """The `Launch` the op's launcher passes to `dispatch.config_for` (built by the op's own `launch`)."""
        from ..ops import scores, select, verify

        if self.kernel == "attention_scores":
            layers = LOOKAHEAD_LAYERS if self.name == "lookahead" else 0
            return scores.launch(arch, self.dtype, batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads,
                                 window=self.rows, head_dim=self.head_dim, block_size=self.block_size,
                                 n_max=self.n_max, heads=(self.score_heads,) * layers if layers else self.score_heads,
                                 layers=layers)
        if self.kernel == "select_tokens":
            return select.launch(arch, batch=self.batch, width=self.history_blocks, block_size=self.block_size)
        dense = self.name == "dense"
        return verify.launch(arch, self.dtype, batch=self.batch, q_heads=self.q_heads, kv_heads=self.kv_heads,
                             window=self.window, head_dim=self.head_dim,
                             slots=self.context if dense else self.budget * self.block_size,
                             block_size=1 if dense else self.block_size, variant="dense" if dense else "")

    def db_key(self, arch: str) -> str:
        return self.launch(arch).key()

    def bytes_moved(self) -> int:
        """The op's bytes floor (`dustin_kernels.measurement`'s bytes model, bench_kernels' too): every
        sequence full length; sparse reads its budget's blocks whole (a partial last block holds fewer)."""
        elem, B, D = DTYPES[self.dtype].itemsize, self.batch, self.head_dim
        if self.kernel == "attention_scores":
            heads, lookahead = self.score_heads, self.name == "lookahead"
            return scores_bytes(B, len(heads), used_kv_heads(heads, self.q_heads // self.kv_heads), D, self.rows,
                                B * self.n_max, math.ceil(self.n_max / self.block_size), elem,
                                layers=LOOKAHEAD_LAYERS if lookahead else 1, lse=lookahead)
        if self.kernel == "select_tokens":
            return select_bytes(B, B * self.history_blocks, self.budget)
        if self.name == "dense":
            return verify_bytes(B, self.q_heads, self.kv_heads, D, self.window, B * self.n_max, elem)
        history = min(self.budget * self.block_size, self.context)
        return verify_bytes(B, self.q_heads, self.kv_heads, D, self.window, B * (history + self.window), elem,
                            B * min(self.budget, self.history_blocks))

    def small(self) -> "Workload":
        """The correctness problem: same spec, batch <= 2, a shorter history (ragged in `build`)."""
        least = {"select": 4 * self.budget * self.block_size, "sparse": 2 * self.budget * self.block_size}
        context = min(self.context, max(1024, least.get(self.name, 0)))
        return dataclasses.replace(self, batch=min(self.batch, 2), context=context)


def from_grid(grid: dict, name: str, kernels, *, workloads=None, shapes=None, batches=None, contexts=None,
              **settings) -> list:
    """Workloads of grid `name` of `autotune/grid.json` for `kernels`: the grid's shapes, batches and
    contexts unless given, its settings (defaults, then the grid's overrides) replaced by `settings`
    that are not None. 'lookahead' runs on the draft preset's shape."""
    from ..shapes import PRESETS

    g = grid["grids"][name]
    s = {**grid["defaults"], **g.get("overrides", {}), **{k: v for k, v in settings.items() if v is not None}}
    out = []
    for kernel in kernels:
        for wname in grid["workloads"][kernel]:
            if workloads and wname not in workloads:
                continue
            for shape in [PRESETS[s["draft"]]] if wname == "lookahead" else shapes or [PRESETS[n] for n in g["shapes"]]:
                for batch in batches or g["batch"]:
                    for context in contexts or g["context"]:
                        out.append(Workload(wname, shape.q_heads, shape.kv_heads, shape.head_dim, s["dtype"],
                                            s["window"], s["block_size"], batch, context, s["budget"], s["heads"]))
    return out


@dataclasses.dataclass
class Problem:
    """Inputs on a device and the op call; `reference()` gives the float64 oracle on CPU."""
    workload: Workload
    inputs: dict
    ragged: bool

    def call(self, backend: str = "triton"):
        w, x = self.workload, self.inputs
        from .. import attention_scores, attention_scores_layers, dense_verify, select_tokens, sparse_verify

        if w.name == "lookahead":
            return attention_scores_layers([x["q"]] * LOOKAHEAD_LAYERS, [x["k"]] * LOOKAHEAD_LAYERS, x["seq_lens"],
                                           heads=[list(w.score_heads)] * LOOKAHEAD_LAYERS,
                                           lses=[x["lse"]] * LOOKAHEAD_LAYERS, block_size=w.block_size,
                                           backend=backend)
        if w.kernel == "attention_scores":
            return attention_scores(x["q"], x["k"], x["seq_lens"], heads=list(w.score_heads),
                                    block_size=w.block_size, backend=backend)
        if w.kernel == "select_tokens":
            return select_tokens(x["s_draft"], x["s_target"], x["seq_lens"], budget=w.budget, m=w.budget // 4,
                                 sink=SINK, recent=RECENT, window=w.window, block_size=w.block_size, backend=backend)
        if w.name == "dense":
            return dense_verify(x["q"], x["k"], x["v"], x["seq_lens"], backend=backend)
        return sparse_verify(x["q"], x["k"], x["v"], x["seq_lens"], x["idx"], x["count"], block_size=w.block_size,
                             backend=backend)

    def baseline(self):
        """The reference op timed beside the winner (dense_verify for 'sparse'), or None."""
        if self.workload.name != "sparse":
            return None
        from .. import dense_verify

        x = self.inputs
        return "dense_verify", lambda: dense_verify(x["q"], x["k"], x["v"], x["seq_lens"])

    def reference(self):
        from .. import ref

        w, x = self.workload, self.inputs
        if w.kernel == "attention_scores":
            one = ref.attention_scores(x["q"], x["k"], x["seq_lens"], heads=list(w.score_heads),
                                       block_size=w.block_size)
            return one * LOOKAHEAD_LAYERS if w.name == "lookahead" else one
        if w.kernel == "select_tokens":
            return ref.select_tokens(x["s_draft"], x["s_target"], x["seq_lens"], w.budget, w.budget // 4, SINK,
                                     RECENT, w.window, w.block_size)
        if w.name == "dense":
            return ref.dense_attention(x["q"], x["k"], x["v"], x["seq_lens"])
        return ref.sparse_verify(x["q"], x["k"], x["v"], x["seq_lens"], x["idx"], x["count"], w.block_size)

    def mismatch(self, out, expected) -> str:
        """'' when the op's output matches the reference, else what differs."""
        w = self.workload
        if w.kernel == "select_tokens":
            for name, got, want in zip(("idx", "count"), out, expected):
                if not torch.equal(got.cpu().long(), want.long()):
                    bad = (got.cpu().long() != want.long()).nonzero()[0].tolist()
                    return f"{name} differs from the reference at {bad}"
            return ""
        atol, rtol = SCORES_TOLERANCE if w.kernel == "attention_scores" else TOLERANCE[w.dtype]
        got = out.detach().double().cpu()
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)} != reference {tuple(expected.shape)}"
        err = (got - expected).abs() - (atol + rtol * expected.abs())
        if not torch.isfinite(got).all() or (err > 0).any():
            worst = (got - expected).abs().nan_to_num(float("inf")).max().item()
            return f"max abs error {worst:.3g} exceeds atol {atol} + rtol {rtol} * |ref|"
        return ""


def build(w: Workload, device, *, ragged: bool = False, seed: int = 0) -> Problem:
    """Random inputs of `w` on `device` (full-length sequences; `ragged`: the last one 3/4 as long)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # tensors are drawn where they live
    g_cpu = torch.Generator().manual_seed(seed)
    dtype = DTYPES[w.dtype]
    B = w.batch
    lens = [w.n_max] * B
    if ragged and B > 1:
        lens[-1] = w.rows + max(1, (3 * w.context) // 4)
    inputs = {"seq_lens": torch.tensor(lens, dtype=torch.int32, device=device)}

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    if w.kernel == "select_tokens":
        W = w.history_blocks
        inputs.update(s_draft=torch.rand(B, W, generator=g, device=device),
                      s_target=torch.rand(B, W, generator=g, device=device))
        return Problem(w, inputs, ragged)
    inputs.update(q=randn(B, w.q_heads, w.rows, w.head_dim), k=randn(B, w.kv_heads, w.n_max, w.head_dim))
    if w.name == "lookahead":  # the rows' lse, as the draft's attention returns it (K serves as V here)
        from .. import dense_verify

        inputs["lse"] = dense_verify(inputs["q"], inputs["k"], inputs["k"], inputs["seq_lens"], return_lse=True,
                                     backend="torch")[1]
    if w.kernel == "sparse_verify":
        inputs["v"] = randn(B, w.kv_heads, w.n_max, w.head_dim)
    if w.name == "sparse":
        idx = torch.full((B, w.budget), -1, dtype=torch.int32)
        count = torch.zeros(B, dtype=torch.int32)
        for b, length in enumerate(lens):
            n = math.ceil((length - w.window) / w.block_size)
            chosen = torch.randperm(n, generator=g_cpu)[: w.budget].sort().values
            idx[b, : len(chosen)] = chosen.int()
            count[b] = len(chosen)
        inputs.update(idx=idx.to(device), count=count.to(device))
    return Problem(w, inputs, ragged)
