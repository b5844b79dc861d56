"""Timing shared by the benchmarks, the kernel demo and the tuner: CUDA-graph capture, quantiles of a
callable's time, the copy bandwidth every "fraction of copy" is taken of, and the git commit of a result's
provenance. Light: torch only (triton on CUDA), so the kernel demo does not need the tuner's extras."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

QUANTILES = (0.2, 0.5, 0.8)
CPU_FLUSH_BYTES = 64 << 20  # written before each CPU call, so no call finds its data in the caches


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


def git_commit(folder: Path) -> str | None:
    """HEAD of the checkout at `folder` ('+dirty' with local changes); `$DUSTIN_GIT_COMMIT` where the
    copy carries no history (a device machine's working tree); None outside git."""
    import subprocess

    if os.environ.get("DUSTIN_GIT_COMMIT"):
        return os.environ["DUSTIN_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")
