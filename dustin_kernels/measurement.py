"""Measurement shared by the benchmarks, the kernel demo and the tuner: the timer (CUDA-graph capture,
quantiles of a callable's time), the copy bandwidth every "fraction of copy" is taken of, the bytes model
(what each op must move: its floor) and the provenance of a result. Light: torch only at import (triton
inside the functions that need it), so the kernel demo does not need the tuner's extras."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import time
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)
CPU_FLUSH_BYTES = 64 << 20  # written before each CPU call, so no call finds its data in the caches
CHECKOUT = Path(__file__).resolve().parents[1]  # the source tree holding this package
INDEX_BYTES = 4  # int32 seq_lens, idx, count
SCORE_BYTES = 4  # float32 scores and log-sum-exp


# --- timing ---------------------------------------------------------------------------------------

def cuda_graph(fn, device: torch.device):
    """fn() captured in a CUDA graph on `device` (launch overhead out of the timing, as engines run
    decode steps), or None where capture fails (an op that syncs or allocates on the host)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # warm-up on a side stream: compiles and fills caches before capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
        return graph
    except Exception:
        torch.cuda.synchronize(device)
        return None


class QuantileTimer:
    """p20/p50/p80 milliseconds of fn(): `triton.testing.do_bench` on CUDA of a CUDA-graph replay (Python
    launch overhead out of kernel timings; plain launches where capture fails or `graphs` is False),
    flushed wall-clock calls on CPU (one warm-up, then `repeats`). `graphed` says how the last call was
    timed."""

    def __init__(self, device: torch.device, repeats: int = 10, graphs: bool = True):
        self.device, self.repeats, self.graphs, self.graphed = torch.device(device), repeats, graphs, False
        self.flush = None if self.device.type == "cuda" else torch.empty(CPU_FLUSH_BYTES, dtype=torch.uint8)

    def __call__(self, fn) -> list[float]:
        if self.device.type == "cuda":
            import triton.testing

            graph = cuda_graph(fn, self.device) if self.graphs else None
            self.graphed = graph is not None
            return list(triton.testing.do_bench(graph.replay if graph else fn, quantiles=list(QUANTILES)))
        fn()  # warm-up (and first-call caches)
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        if len(times) == 1:
            return times * len(QUANTILES)
        cuts = statistics.quantiles(times, n=10, method="inclusive")  # deciles: p20, p50, p80 are cuts 2, 5, 8
        return [cuts[1], statistics.median(times), cuts[7]]


def copy_gbs(device: torch.device) -> float:
    """Read + write GB/s of one large device-to-device copy (1 GiB on CUDA, 256 MiB on CPU): the
    bandwidth that the tuner's and the benchmark's fractions are taken of. Launched plainly, not
    replayed from a CUDA graph: on an H200 the replayed copy ran at 2.7 TB/s against 4.2 TB/s
    launched (a captured device-to-device copy becomes a graph memcpy node), slower than kernels
    read memory (dense_verify: 3.1 TB/s), so fractions of it overstated every kernel."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    median_ms = QuantileTimer(device, repeats=5, graphs=False)(lambda: dst.copy_(src))[1]
    return 2 * nbytes / median_ms / 1e6


# --- bytes model ----------------------------------------------------------------------------------
# An op's floor: every input element it needs read once, every output element written once; no split-KV
# partials, spills or second reads (a kernel that reads K twice runs at most at half its floor's bandwidth).
# Counts "summed over the batch" take ragged sequences as they are.

def used_kv_heads(heads, group: int) -> int:
    """KV heads that the q-heads `heads` read (q-head h reads KV head h // group)."""
    return len({h // group for h in heads})


def verify_bytes(batch: int, q_heads: int, kv_heads: int, head_dim: int, window: int, kv_rows: int, itemsize: int,
                 index_entries: int | None = None) -> int:
    """Floor of dense_verify and sparse_verify: q [B, Hq, T, D] read and the output of its shape written,
    the K and V of `kv_rows` positions (summed over the batch) in every KV head, seq_lens [B]; with
    `index_entries` (sparse) also that many idx entries (those below count, summed over the batch) and count [B]."""
    q_and_out = 2 * batch * q_heads * window * head_dim * itemsize
    kv = 2 * kv_rows * kv_heads * head_dim * itemsize
    index = 0 if index_entries is None else INDEX_BYTES * (index_entries + batch)
    return q_and_out + kv + INDEX_BYTES * batch + index


def scores_bytes(batch: int, heads: int, kv_heads: int, head_dim: int, rows: int, keys: int, out_cols: int,
                 itemsize: int, *, layers: int = 1, lse: bool = False) -> int:
    """Floor of attention_scores (layers 1) and attention_scores_layers (`layers` layers of one shape): per
    layer the K of `keys` valid positions (summed over the batch) in the `kv_heads` KV heads that the
    `heads` chosen q-heads use, the chosen q rows [B, heads, rows, D] and, with `lse` (given, not computed),
    their float32 log-sum-exp [B, heads, rows]; once: seq_lens [B] and the float32 output [B, out_cols]."""
    per_layer = (keys * kv_heads + batch * heads * rows) * head_dim * itemsize
    if lse:
        per_layer += SCORE_BYTES * batch * heads * rows
    return layers * per_layer + SCORE_BYTES * batch * out_cols + INDEX_BYTES * batch


def select_bytes(batch: int, history_blocks: int, budget: int) -> int:
    """Floor of select_tokens: the float32 draft and target scores of `history_blocks` history blocks
    (summed over the batch; the window's blocks are not read) and seq_lens [B] read, the int32 idx
    [B, budget] (blocks) and count [B] written."""
    return 2 * SCORE_BYTES * history_blocks + INDEX_BYTES * batch * (budget + 2)


# --- provenance -----------------------------------------------------------------------------------

def git_commit() -> str | None:
    """HEAD of the checkout holding this package ('+dirty' with local changes); `$DUSTIN_GIT_COMMIT` where the
    copy carries no history (a device machine's working tree); None outside git."""
    import subprocess

    if os.environ.get("DUSTIN_GIT_COMMIT"):
        return os.environ["DUSTIN_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=CHECKOUT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model (/proc/cpuinfo; elsewhere what `platform` knows)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    """torch and triton versions."""
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def provenance(device: torch.device, command: list[str]) -> dict:
    """Where and how a result was measured: device (`device_name`), device_type, on CUDA capability and
    cuda, on CPU threads; torch, triton, version (this package's), commit (`git_commit`, 'unknown' outside
    git), date (UTC), command ('python' + `command`: the script and its arguments), host and loadavg_1min
    (other work on the machine). Each tool adds its own settings."""
    from . import __version__

    meta = {"device": device_name(device), "device_type": device.type, **versions(), "version": __version__,
            "commit": git_commit() or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", *command]), "host": platform.node()}
    if device.type == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        meta["cuda"] = torch.version.cuda
    else:
        meta["threads"] = torch.get_num_threads()
    meta["loadavg_1min"] = os.getloadavg()[0]
    return meta
