"""Kernel benchmark: sparse verification against dense verification, and the cost of the selection.

For each (batch, context) it times dense verification by the dense mode of our kernel, by
`torch.nn.functional.scaled_dot_product_attention` and, where installed and the dtype allows, by
`flash_attn.flash_attn_with_kvcache` and FlashInfer's paged prefill/append wrapper; the selection
inputs (`attention_scores` for the draft lookahead and the target estimation); and for each budget
`select_tokens` and `sparse_verify`. Every row has the bytes the op must move (its floor: FLOORS),
p20/p50/p80 time, achieved GB/s and its fraction of the copy bandwidth measured in the same run.

    python tools/bench_kernels.py                          # CUDA: qwen2.5-72b; CPU: cpu-small
    python tools/bench_kernels.py --preset qwen2.5-72b --batch 16 --context 32K --budget 512

Protocol. CUDA: each op is captured in a CUDA graph (as engines run decode; plain launches where
capture fails, said per row) and its replay timed with `triton.testing.do_bench` quantiles (25 ms
warm-up, 100 ms of timed calls; it zeroes a 256 MB buffer before every timed call, flushing L2). CPU: one
warm-up call, then --repeats timed calls, each after zeroing a 64 MiB buffer (more than this machine's 32 MiB
L3), wall-clock quantiles.
Each op is timed through its backend path (`ops.<family>._<backend>_<op>`, what the public function
dispatches to) after one validated public call: the public functions read idx / seq_lens on the host
to validate them (skipped under CUDA-graph capture), which would otherwise dominate microsecond kernels.

Workload. Every sequence holds `context` history tokens plus the T window tokens (seq_lens =
context + T), random normal data. Budgets are history tokens, passed to `select_tokens` as
budget / block_size blocks, with m = a quarter of them, sink 4 and recent 16 tokens (rounded up to
blocks). Retrieval heads: 4 q-heads spread over the heads (i * Hq // 4). Draft lookahead: the T
window queries of 3 layers x 4 heads of the --draft preset (qwen2.5-0.5b) on its K cache, with the
rows' log-sum-exp given (the draft's own attention keeps it), one `attention_scores_layers` launch
(one layer's buffers passed for all 3: the same bytes from memory); target estimation: one query row
on 1 layer x 4 heads of the target. Selection share = (draft + target + select) / (layers x one
layer's sparse_verify): the selection runs once per step and its index serves every target layer
(layers from the preset).

Bytes floors: FLOORS below (also written into each result file), counted by the bytes model of
`dustin_kernels.measurement` (the tuner's too). Copy bandwidth counts the bytes read plus the bytes
written by one large copy (1 GiB on CUDA, 256 MiB on CPU; launched plainly, see
`dustin_kernels.measurement.copy_gbs`, the tuner's figure too), like the floors, so copy_frac is
the fraction of the device's measured memory speed that an op achieves on its floor.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dustin_kernels import (attention_scores, attention_scores_layers, dense_verify, dispatch,  # noqa: E402
                            select_tokens, sparse_verify)
from dustin_kernels import codegen  # noqa: E402
from dustin_kernels.ops import scores as scores_ops, select as select_ops, verify as verify_ops  # noqa: E402
from dustin_kernels.measurement import (CPU_FLUSH_BYTES, QUANTILES, QuantileTimer, copy_gbs, provenance,  # noqa: E402
                                        scores_bytes, select_bytes, used_kv_heads, verify_bytes)
from dustin_kernels.devices import default_device, device_arg  # noqa: E402
from dustin_kernels.shapes import PRESETS, spread_heads  # noqa: E402
from dustin_kernels.spec import DTYPES  # noqa: E402

SMALL_GRID = dict(batch=[1, 4], context=[4096, 16384, 32768], budget=[256])  # cpu-small: < 1 minute here
FULL_GRID = dict(batch=[1, 4, 16], context=[4096 << i for i in range(6)], budget=[128, 512, 2048])
DRAFT_LAYERS, RETRIEVAL_HEADS = 3, 4
BASELINES = ("sdpa", "flash_attn", "flashinfer")
# what each row's `bytes` counts (dustin_kernels.measurement's bytes model): every input element the op needs
# read once, every output element written once; no split-KV partials or spills
FLOORS = {
    "sparse_verify": "q, the selected history K/V rows of every KV head (distinct positions below ctx_len), the T "
                     "window K/V rows, the used idx entries (below count), count, seq_lens, the output",
    "dense_verify": "q, every valid K/V row of every KV head (seq_lens), seq_lens, the output; the same for every "
                    "provider (the SDPA mask and FlashInfer's page table are not counted)",
    "attention_scores": "the valid K rows of the KV heads that the chosen q-heads use, once (the two-pass "
                        "kernel reads them twice: at most 50% of this floor's bandwidth; ONE_PASS reads them once "
                        "and adds 8 bytes per row and block), the chosen q rows, seq_lens, the float32 "
                        "[B, ceil(N_max / block_size)] output",
    "attention_scores_layers": "per layer, the valid K rows of the used KV heads once, the chosen q rows and "
                               "their float32 log-sum-exp; seq_lens and the float32 output once",
    "select_tokens": "both float32 score rows over the history blocks (ceil(ctx_len / block_size)) once, "
                     "seq_lens, the int32 idx [B, budget blocks] and count",
}
FIELDS = ("kernel", "provider", "preset", "dtype", "window", "block_size", "batch", "context", "budget",
          "bytes", "p20_ms", "p50_ms", "p80_ms", "gbps", "copy_frac", "ideal_ratio", "floor_ratio",
          *(f"speedup_vs_{name}" for name in ("dense", *BASELINES)), "selection_ms", "selection_share",
          "max_abs_diff", "cuda_graph", "device", "version", "torch", "triton", "commit")


# --- the workload ---------------------------------------------------------------------------------


class Buffers:
    """Random q / K / V at the largest batch and context of the grid; each row takes views of them."""

    def __init__(self, shape, draft, batch: int, context: int, window: int, dtype, device):
        n = round_up(context + window, 16)
        g = torch.Generator(device=device).manual_seed(0)

        def randn(*size):
            return torch.randn(*size, generator=g, device=device, dtype=dtype)

        self.q = randn(batch, shape.q_heads, window, shape.head_dim)
        self.q_last = randn(batch, shape.q_heads, 1, shape.head_dim)  # the last committed query
        self.k = randn(batch, shape.kv_heads, n, shape.head_dim)
        self.v = randn(batch, shape.kv_heads, n, shape.head_dim)
        self.q_draft = randn(batch, draft.q_heads, window, draft.head_dim)
        self.k_draft = randn(batch, draft.kv_heads, n, draft.head_dim)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def make_sdpa(q, k, v, seq_lens, scale):
    """scaled_dot_product_attention over the whole valid cache, causal: fn() -> [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q_rows = q.reshape(B, Hkv, G * T, D)  # row g*T + t of KV head h is q head h*G + g at window row t
    pos = (seq_lens.long()[:, None] - T + torch.arange(T, device=q.device)).repeat(1, G)  # [B, G*T]
    visible = torch.arange(n, device=q.device)[None, None, :] <= pos[:, :, None]
    mask = torch.zeros(B, 1, G * T, n, dtype=q.dtype, device=q.device)
    mask.masked_fill_(~visible[:, None], float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(q_rows, k, v, attn_mask=mask, scale=scale).reshape(B, Hq, T, D)


def make_flash_attn(q, k_nhd, v_nhd, seq_lens, scale):
    from flash_attn import flash_attn_with_kvcache

    q_nhd = q.transpose(1, 2).contiguous()  # [B, T, Hq, D]
    return lambda: flash_attn_with_kvcache(q_nhd, k_nhd, v_nhd, cache_seqlens=seq_lens, softmax_scale=scale,
                                           causal=True).transpose(1, 2)


def make_flashinfer(q, k_nhd, v_nhd, seq_lens, scale, page: int = 16):
    """FlashInfer's batch prefill/append over pages of 16 tokens (an NHD view of the same copy as flash_attn)."""
    import flashinfer

    B, Hq, T, D = q.shape
    n, Hkv = k_nhd.shape[1], k_nhd.shape[2]
    k_pages = k_nhd.view(B * n // page, page, Hkv, D)
    v_pages = v_nhd.view(B * n // page, page, Hkv, D)
    lens = seq_lens.long()
    used = (lens + page - 1) // page
    indptr = torch.cat([used.new_zeros(1), used.cumsum(0)]).int()
    indices = torch.cat([b * (n // page) + torch.arange(int(u), device=q.device) for b, u in enumerate(used)]).int()
    last = (lens - (used - 1) * page).int()
    qo_indptr = (torch.arange(B + 1, device=q.device) * T).int()
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device=q.device), "NHD")
    wrapper.plan(qo_indptr, indptr, indices, last, Hq, Hkv, D, page, causal=True, sm_scale=scale,
                 q_data_type=q.dtype, kv_data_type=q.dtype)
    q_rows = q.transpose(1, 2).reshape(B * T, Hq, D)
    return lambda: wrapper.run(q_rows, (k_pages, v_pages)).view(B, T, Hq, D).transpose(1, 2)


# --- the run --------------------------------------------------------------------------------------

class Bench:
    """One run: the settings, the timer, the buffers and the rows measured so far."""

    def __init__(self, args, argv: list[str]):
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        self.shape, self.draft = PRESETS[args.preset], PRESETS[args.draft]
        self.T, self.bs, self.budgets = args.window, args.block_size, args.budget
        self.backend = dispatch.backend_for(args.backend, self.device)
        self.esize = torch.empty(0, dtype=self.dtype).element_size()
        self.scale, self.draft_scale = self.shape.head_dim ** -0.5, self.draft.head_dim ** -0.5
        self.target_heads, self.draft_heads = (spread_heads(self.shape.q_heads, RETRIEVAL_HEADS),
                                              spread_heads(self.draft.q_heads, RETRIEVAL_HEADS))
        self.impl = {name: getattr(mod, f"_{self.backend}_{name}") for name, mod in (
            ("sparse_verify", verify_ops), ("attention_scores", scores_ops), ("select_tokens", select_ops))}
        self.timer = QuantileTimer(self.device, args.repeats)
        self.meta = provenance(self.device, ["tools/bench_kernels.py", *argv])
        self.meta.update(
            preset=args.preset, shape=vars(self.shape) | {"group": self.shape.group}, draft=args.draft,
            draft_shape=vars(self.draft), dtype=args.dtype, window=self.T, block_size=self.bs, backend=self.backend,
            retrieval_heads={"target": list(self.target_heads), "draft": list(self.draft_heads)},
            draft_layers=DRAFT_LAYERS, quantiles=list(QUANTILES), floors=FLOORS,
            timing="triton.testing.do_bench of CUDA-graph replays (cuda_graph column), L2 flushed"
            if self.device.type == "cuda" else
            f"wall clock, {args.repeats} calls, {CPU_FLUSH_BYTES >> 20} MiB flush before each",
            copy_gbps=copy_gbs(self.device))
        self.skipped = {}  # baseline -> why it has no rows
        for name in ("flash_attn", "flashinfer"):
            if self.device.type != "cuda":
                self.skipped[name] = "needs CUDA"
            elif importlib.util.find_spec(name) is None:
                self.skipped[name] = "not installed"
        self.meta["skipped"] = self.skipped
        self.common = {"preset": args.preset, "dtype": args.dtype, "window": self.T, "block_size": self.bs,
                       **{key: self.meta[key] for key in ("device", "version", "torch", "triton", "commit")}}
        self.buf = Buffers(self.shape, self.draft, max(args.batch), max(args.context), self.T, self.dtype,
                           self.device)
        self.rows = []

    def record(self, kernel, provider, batch, context, budget, nbytes, fn, **extra) -> dict:
        p20, p50, p80 = self.timer(fn)
        gbps = nbytes / (p50 * 1e-3) / 1e9
        row = dict.fromkeys(FIELDS) | self.common | dict(
            kernel=kernel, provider=provider, batch=batch, context=context, budget=budget, bytes=nbytes,
            p20_ms=p20, p50_ms=p50, p80_ms=p80, gbps=gbps, copy_frac=gbps / self.meta["copy_gbps"],
            cuda_graph=self.timer.graphed) | extra
        self.rows.append(row)
        return row

    def config(self, B: int, C: int) -> None:
        """Every row of one batch size and context length."""
        T, n = self.T, round_up(C + self.T, 16)
        buf = self.buf
        q, k, v = buf.q[:B], buf.k[:B, :, :n], buf.v[:B, :, :n]
        seq_lens = torch.full((B,), C + T, dtype=torch.int32, device=self.device)
        shape, draft, esize = self.shape, self.draft, self.esize
        dense_bytes = verify_bytes(B, shape.q_heads, shape.kv_heads, shape.head_dim, T, B * (C + T), esize)
        dense = self.dense_rows(B, C, q, k, v, seq_lens, dense_bytes)

        # the selection's inputs: draft lookahead (DRAFT_LAYERS draft layers, T rows, lse given) and target
        # estimation (one row)
        q_draft, k_draft = buf.q_draft[:B], buf.k_draft[:B, :, :n]
        q_last, last_lens = buf.q_last[:B], seq_lens - (T - 1)
        _, lse_draft = dense_verify(q_draft, k_draft, k_draft, seq_lens, return_lse=True, backend=self.backend)
        layers = dict(qs=[q_draft] * DRAFT_LAYERS, k_caches=[k_draft] * DRAFT_LAYERS, lses=[lse_draft] * DRAFT_LAYERS)
        s_draft = attention_scores_layers(**layers, seq_lens=seq_lens, heads=[self.draft_heads] * DRAFT_LAYERS,
                                          block_size=self.bs, backend=self.backend)
        s_target = attention_scores(q_last, k, last_lens, heads=self.target_heads, block_size=self.bs,
                                    backend=self.backend)
        draft_row = self.record(
            "attention_scores_layers[draft]", self.backend, B, C, None,
            scores_bytes(B, len(self.draft_heads), used_kv_heads(self.draft_heads, draft.group), draft.head_dim, T,
                         B * (C + T), s_draft.shape[1], esize, layers=DRAFT_LAYERS, lse=True),
            lambda: scores_ops._attention_scores_layers_into(
                *layers.values(), seq_lens, s_draft, list(self.draft_heads) * DRAFT_LAYERS,
                [len(self.draft_heads)] * DRAFT_LAYERS, self.bs, self.draft_scale, self.backend))
        target_row = self.record(
            "attention_scores[target]", self.backend, B, C, None,
            scores_bytes(B, len(self.target_heads), used_kv_heads(self.target_heads, shape.group), shape.head_dim, 1,
                         B * (C + 1), s_target.shape[1], esize),
            lambda: self.impl["attention_scores"](q_last, k, last_lens, self.target_heads, self.bs, self.scale))
        scores_ms = draft_row["p50_ms"] + target_row["p50_ms"]

        for budget in self.budgets:
            bs = self.bs
            blocks, m, sink, recent = budget // bs, budget // bs // 4, math.ceil(4 / bs), math.ceil(16 / bs)
            sel = (s_draft, s_target, seq_lens, blocks, m, sink, recent, T, bs)
            idx, count = select_tokens(s_draft, s_target, seq_lens, budget=blocks, m=m, sink=sink, recent=recent,
                                       window=T, block_size=bs, backend=self.backend)
            select_row = self.record("select_tokens", self.backend, B, C, budget,
                                     select_bytes(B, B * math.ceil(C / bs), blocks),
                                     lambda: self.impl["select_tokens"](*sel))
            sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, backend=self.backend)  # validates idx
            used = torch.arange(blocks, device=self.device)[None, :] < count[:, None]
            selected = int(((C - idx.long() * bs).clamp(0, bs) * used).sum())  # history tokens read
            sparse_bytes = verify_bytes(B, shape.q_heads, shape.kv_heads, shape.head_dim, T, selected + B * T, esize,
                                        int(count.sum()))
            row = self.record("sparse_verify", self.backend, B, C, budget, sparse_bytes, lambda: self.impl[
                "sparse_verify"](q, k, v, seq_lens, idx, count, None, block_size=bs, scale=self.scale, variant=""))
            selection_ms = scores_ms + select_row["p50_ms"]
            row.update(ideal_ratio=B * C / selected, floor_ratio=dense_bytes / sparse_bytes,
                       selection_ms=selection_ms, selection_share=selection_ms / (self.shape.layers * row["p50_ms"]),
                       **{f"speedup_vs_{name}": r["p50_ms"] / row["p50_ms"] for name, r in dense.items()})

    def dense_rows(self, B: int, C: int, q, k, v, seq_lens, dense_bytes: int) -> dict:
        """Dense verification by our dense mode and each baseline; returns provider -> row."""
        scale = self.scale
        reference = dense_verify(q, k, v, seq_lens, backend=self.backend).float()
        rows = {"dense": self.record("dense_verify", self.backend, B, C, None, dense_bytes, lambda: self.impl[
            "sparse_verify"](q, k, v, seq_lens, None, None, None, block_size=1, scale=scale, variant="dense"))}
        makers = {"sdpa": lambda: make_sdpa(q, k, v, seq_lens, scale)}
        if {"flash_attn", "flashinfer"} - self.skipped.keys():  # both want [B, N, Hkv, D] caches
            k_nhd, v_nhd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            makers["flash_attn"] = lambda: make_flash_attn(q, k_nhd, v_nhd, seq_lens, scale)
            makers["flashinfer"] = lambda: make_flashinfer(q, k_nhd, v_nhd, seq_lens, scale)
        for name, make in makers.items():
            if name in self.skipped:
                continue
            try:
                fn = make()
                diff = float((fn().float() - reference).abs().max())
            except Exception as err:  # e.g. a dtype or head dim the library does not support
                self.skipped[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
                continue
            rows[name] = self.record("dense_verify", name, B, C, None, dense_bytes, fn, max_abs_diff=diff)
        return rows


def run(args, argv: list[str]) -> tuple[dict, list[dict]]:
    """Measure the grid; returns (provenance and settings, rows)."""
    bench = Bench(args, argv)
    with torch.inference_mode():
        for B in args.batch:
            for C in args.context:
                bench.config(B, C)
    return bench.meta, bench.rows


# --- output ---------------------------------------------------------------------------------------

def fmt(value, spec: str, width: int, suffix: str = "") -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width - len(suffix)}{spec}}{suffix}"


def print_tables(meta: dict, rows: list[dict]) -> None:
    shape = meta["shape"]
    print(f"bench_kernels: {meta['preset']} (Hq {shape['q_heads']}, Hkv {shape['kv_heads']}, D {shape['head_dim']}), "
          f"{meta['dtype']}, T {meta['window']}, block {meta['block_size']}, backend {meta['backend']}; "
          f"{meta['device']}, copy bandwidth {meta['copy_gbps']:.1f} GB/s, load average {meta['loadavg_1min']:.1f}; "
          f"{meta['timing']}")
    for name, why in meta["skipped"].items():
        print(f"  skipped {name}: {why}")
    print(f"\n{'kernel':24} {'provider':10} {'B':>3} {'context':>7} {'budget':>6} {'floor MiB':>9} "
          f"{'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} {'GB/s':>7} {'%copy':>6}")
    for r in rows:
        print(f"{r['kernel']:24} {r['provider']:10} {r['batch']:3d} {r['context']:7d} {fmt(r['budget'], 'd', 6)} "
              f"{r['bytes'] / 2**20:9.2f} {r['p20_ms']:8.3f} {r['p50_ms']:8.3f} {r['p80_ms']:8.3f} "
              f"{r['gbps']:7.1f} {100 * r['copy_frac']:5.1f}%")
    print(f"\nsparse_verify speedup over dense verification (p50 ratios); selection (draft scores of {DRAFT_LAYERS} "
          "layers + target scores + select) as a share of a step's sparse attention (one sparse_verify per "
          "target layer)")
    print(f"{'B':>3} {'context':>7} {'budget':>6} {'sparse ms':>9} {'%copy':>6} {'x dense':>8} {'ideal':>7} "
          f"{'floor':>7} {'x sdpa':>7} {'x flash':>7} {'x finfer':>8} {'select ms':>9} {'share':>8}")
    for r in (r for r in rows if r["kernel"] == "sparse_verify"):
        print(f"{r['batch']:3d} {r['context']:7d} {r['budget']:6d} {r['p50_ms']:9.3f} {100 * r['copy_frac']:5.1f}% "
              f"{fmt(r['speedup_vs_dense'], '.2f', 8, 'x')} {r['ideal_ratio']:6.1f}x {r['floor_ratio']:6.1f}x "
              f"{fmt(r['speedup_vs_sdpa'], '.2f', 7, 'x')} {fmt(r['speedup_vs_flash_attn'], '.2f', 7, 'x')} "
              f"{fmt(r['speedup_vs_flashinfer'], '.2f', 8, 'x')} {r['selection_ms']:9.3f} "
              f"{100 * r['selection_share']:7.0f}%")


def write(meta: dict, rows: list[dict], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-") if meta["device_type"] == "cuda" else "cpu"
    stem = out / f"bench_kernels_{meta['preset']}_{meta['dtype']}_{slug}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def tokens(text: str) -> int:
    """An int with an optional K suffix (x1024): '32K' -> 32768."""
    match = re.fullmatch(r"(\d+)([kK]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected an int like 4096 or 4K, got {text!r}")
    return int(match[1]) * (1024 if match[2] else 1)


def parse_args(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-72b" if cuda else "cpu-small",
                        help="target attention shape (default: qwen2.5-72b on CUDA, else cpu-small)")
    parser.add_argument("--draft", choices=sorted(PRESETS), default="qwen2.5-0.5b",
                        help="draft attention shape of the draft lookahead scores (default: qwen2.5-0.5b)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 4 16; cpu-small: 1 4)")
    parser.add_argument("--context", type=tokens, nargs="+",
                        help="history tokens per sequence, 4096 or 4K (default: 4K 8K .. 128K; cpu-small: 4K 16K 32K)")
    parser.add_argument("--budget", type=tokens, nargs="+",
                        help="selected history tokens per sequence (default: 128 512 2048; cpu-small: 256)")
    parser.add_argument("--window", type=int, default=5, help="T = gamma + 1 verified tokens (default: 5)")
    parser.add_argument("--block-size", type=int, default=1, help="selection granularity in tokens (default: 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32",
                        help="q / K / V dtype (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--backend", choices=dispatch.BACKENDS,
                        help="backend of our ops (default: triton on CUDA, torch on CPU; triton on CPU needs "
                             "TRITON_INTERPRET=1)")
    parser.add_argument("--device", type=device_arg, default=default_device(), help="(default: cuda if available)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timed calls per row on CPU (default: 10; CUDA: do_bench's 100 ms)")
    parser.add_argument("--out", type=Path, default=codegen.cache_dir().parent / "bench",
                        help="folder of the JSON and CSV files (default: $DUSTIN_CACHE_DIR/bench, else "
                             "~/.cache/dustin_kernels/bench; pass tools/results to update the tracked results)")
    args = parser.parse_args(argv)
    grid = SMALL_GRID if args.preset == "cpu-small" else FULL_GRID
    for key, default in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.block_size < 1 or args.block_size & (args.block_size - 1):
        parser.error(f"--block-size: expected a power of two, got {args.block_size}")
    for budget in args.budget:
        if budget % args.block_size or budget // args.block_size < math.ceil(4 / args.block_size) + math.ceil(
                16 / args.block_size):
            parser.error(f"--budget: expected a multiple of --block-size holding sink 4 + recent 16 tokens, "
                         f"got {budget}")
    if min(args.batch) < 1 or min(args.context) < 1 or args.window < 1 or args.repeats < 1:
        parser.error("--batch, --context, --window and --repeats must be positive")
    try:
        dispatch.backend_for(args.backend, torch.device(args.device))
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.perf_counter()
    meta, rows = run(args, argv)
    meta["run_s"] = round(time.perf_counter() - start, 1)
    print_tables(meta, rows)
    json_path, csv_path = write(meta, rows, args.out)
    print(f"\n{len(rows)} rows in {meta['run_s']} s -> {json_path}, {csv_path}")


if __name__ == "__main__":
    main()
