"""Input validation shared by the public ops: every error names the argument and what was expected.

The ops are inference ops (no autograd): a tensor that requires grad is refused, never silently detached."""
from __future__ import annotations

import contextvars
import functools
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES, shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor{shape_doc and ' ' + shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if t.requires_grad:
        raise ValueError(f"{name}: expected a tensor that does not require grad (dustin_kernels ops are inference "
                         "ops, without autograd): pass .detach() or build it under torch.no_grad()")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}  # others: their own checks
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected a tensor on {first} like the other inputs, got {dev}")
    return first


def check_power_of_two(name: str, value, upper: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
        raise ValueError(f"{name}: expected a power-of-two int, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name}: expected at most {upper}, got {value}")


def check_int(name: str, value, lo: int, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an int {bound}, got {value}")


_value_checks = contextvars.ContextVar("dustin_kernels_value_checks", default=True)


class trusted_inputs:
    """Within `with trusted_inputs():` (or on a function decorated `@trusted_inputs()`) the ops skip the
    checks that read tensor values on the host (lengths within the cache, block indices within the
    history): for callers that built or checked those tensors once, such as a decode loop calling
    `sparse_verify` on every layer; on CUDA each such check is a host sync. Shapes, dtypes and devices
    are still checked. While torch.compile / torch.export trace, it does nothing (they skip the value
    checks anyway), so a compiled function may use it with fullgraph=True."""

    def __enter__(self):
        if not torch.compiler.is_compiling():
            self._token = _value_checks.set(False)
        return self

    def __exit__(self, *exc):
        if not torch.compiler.is_compiling():
            _value_checks.reset(self._token)

    def __call__(self, fn):
        @functools.wraps(fn)
        def trusted(*args, **kwargs):
            with trusted_inputs():  # a fresh context per call: re-entrant, and traceable by dynamo
                return fn(*args, **kwargs)
        return trusted


def values_checkable(t: torch.Tensor) -> bool:
    """Value checks read the tensor on the host; skipped inside `trusted_inputs()`, while torch.compile /
    torch.export trace (their tensors hold no values) and while a CUDA graph is being captured."""
    if torch.compiler.is_compiling():
        return False
    return _value_checks.get() and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_out(out, shape: tuple, dtype: torch.dtype, device: torch.device, name: str = "out") -> torch.Tensor:
    """`out` when it is a contiguous tensor of `shape`, `dtype` on `device`; a new one when it is None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    dims = ", ".join(map(str, shape))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected None or a torch.Tensor [{dims}], got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"{name}: expected a {str(dtype).replace('torch.', '')} tensor [{dims}] on {device}, got "
                         f"{str(out.dtype).replace('torch.', '')} {list(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (the kernels write it row-major), got strides "
                         f"{out.stride()}")
    if out.requires_grad:
        raise ValueError(f"{name}: expected a tensor that does not require grad (dustin_kernels ops are inference ops)")
    return out


def check_seq_lens(seq_lens, batch: int, window: int, n_max: int, device: torch.device) -> None:
    """seq_lens: int32[B], each in [window, n_max] (the window tokens are already in the cache)."""
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), "int32[B]")
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens: expected shape [{batch}] (one length per sequence), got {tuple(seq_lens.shape)}")
    if seq_lens.device != device:
        raise ValueError(f"seq_lens: expected a tensor on {device} like the other inputs, got {seq_lens.device}")
    if values_checkable(seq_lens) and batch:
        lo, hi = int(seq_lens.min()), int(seq_lens.max())
        if lo < window:
            raise ValueError(f"seq_lens: every length must hold the window of {window} tokens, got a length {lo}")
        if hi > n_max:
            raise ValueError(f"seq_lens: lengths must not exceed the cache size N_max={n_max}, got {hi}")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 0 < scale < math.inf:
        raise ValueError(f"scale: expected a positive finite float or None (1/sqrt(D)), got {scale!r}")
    return float(scale)


def check_qk(q, k_cache) -> tuple[int, int, int, int, int]:
    """q: [B, Hq, T, D], k_cache: [B, Hkv, N_max, D] with Hq = G * Hkv; returns (B, Hq, Hkv, T, D)."""
    check_tensor("q", q, 4, shape_doc="[B, Hq, T, D]")
    check_tensor("k_cache", k_cache, 4, shape_doc="[B, Hkv, N_max, D]")
    B, Hq, T, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache: expected shape [B={B}, Hkv, N_max, D={D}], got {tuple(k_cache.shape)}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q: number of heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv} of k_cache")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache: expected dtype {q.dtype} like q, got {k_cache.dtype}")
    if T < 1:
        raise ValueError(f"q: expected at least one query row (T >= 1), got shape {tuple(q.shape)}")
    if D < 1:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {tuple(q.shape)}")
    return B, Hq, Hkv, T, D
