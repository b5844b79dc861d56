"""One spec names a specialised kernel: its rendered file, compile-cache entry, perf-DB key and test id.

A spec holds only what changes the generated code (template constants): kernel family, arch path,
dtype, head dim, GQA group, window T, block size and variant. Launch settings that do not change the
code (tile sizes, warps, stages, split count) are a separate `config` dict, chosen by dispatch for a
`Launch`: the spec and the problem size the config depends on, which is also the perf-DB entry key.
"""
from __future__ import annotations

import dataclasses

import torch

KERNELS = ("attention_scores", "select_tokens", "sparse_verify")
ARCHS = ("sm80", "sm90", "interp")  # interp: Triton's CPU interpreter (fp32 math after every load)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    kernel: str
    arch: str
    dtype: str = "fp32"
    head_dim: int = 0  # 0 where the kernel has no head dim (select_tokens)
    group: int = 0  # rows of one KV head handled by a program (GQA group or selected heads)
    window: int = 0  # T, query rows per head
    block_size: int = 1
    variant: str = ""  # e.g. "paged" / "dense" for sparse_verify

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {self.kernel!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: expected a power of two, got {self.block_size}")

    def uri(self) -> str:
        """Stable name, e.g. `sparse_verify_sm90_bf16_d128_g8_t5_bs1`; also the test id and DB key."""
        parts = [self.kernel, self.arch, self.dtype]
        if self.head_dim:
            parts.append(f"d{self.head_dim}")
        if self.group:
            parts.append(f"g{self.group}")
        if self.window:
            parts.append(f"t{self.window}")
        parts.append(f"bs{self.block_size}")
        if self.variant:
            parts.append(self.variant)
        return "_".join(parts)

    def template_vars(self) -> dict:
        """Constants the template is rendered with."""
        return {
            "kernel": self.kernel,
            "arch": self.arch,
            "interpret": self.arch == "interp",
            "dtype": self.dtype,
            "head_dim": self.head_dim,
            "block_d": next_pow2(self.head_dim) if self.head_dim else 0,
            "group": self.group,
            "window": self.window,
            "block_size": self.block_size,
            "variant": self.variant,
        }

    @classmethod
    def from_uri(cls, uri: str) -> "KernelSpec":
        """Inverse of `uri()`."""
        kernel = next((k for k in KERNELS if uri.startswith(k + "_")), None)
        if kernel is None:
            raise ValueError(f"uri: expected '<kernel>_<arch>_<dtype>_...', got {uri!r}")
        arch, dtype, *rest = uri[len(kernel) + 1:].split("_")
        fields = {"d": "head_dim", "g": "group", "t": "window", "bs": "block_size"}
        kw: dict = {}
        for part in rest:
            key = part.rstrip("0123456789")
            if key in fields and part[len(key):]:
                kw[fields[key]] = int(part[len(key):])
            else:
                kw["variant"] = part
        return cls(kernel, arch, dtype, **kw)


@dataclasses.dataclass(frozen=True)
class Launch:
    """A kernel launch as dispatch sees it: the spec and the problem size its launch config is chosen by.

    batch: sequences; context: what one sequence's loop walks (each op's `default_config` says which);
    kv_heads: the KV heads of the grid for the ops whose config depends on them (sparse_verify's split
    count), else 0. Each op builds its Launch with one function (`ops.<op>.launch`), which its launcher
    and the tuner's workloads both call. `key()` is its perf-DB entry key.
    """
    spec: KernelSpec
    batch: int
    context: int
    kv_heads: int = 0

    def key(self) -> str:
        from .perf_db import entry_key

        return entry_key(self.spec.uri(), self.batch, self.context, self.kv_heads)
