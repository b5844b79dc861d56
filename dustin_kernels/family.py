"""One descriptor per op family (FlashInfer's `JitSpec` idea): everything the tools need to know about a
kernel family comes from one object, `ops.<op>.FAMILY`, instead of copies kept by hand in the AOT
check, the tuner's workloads and the op.

- `launch(arch, ...) -> spec.Launch`: the spec and the problem size (the perf-DB key) of a call, from
  shapes; the op's launcher and `autotune.workloads.Workload.launch` both call it;
- `default_config(launch) -> dict`: the documented launch config when the perf DB has no entry;
- `aot_launches(arch) -> list[Launch]`: what `python -m dustin_kernels.aot` compiles (model shapes,
  the headline batch and context, their KV heads);
- `aot_kernels(spec, config) -> list[aot.AotKernel]`: the jit functions with argument types
  (`aot.AotKernel.of`: types by argument name from the rendered kernel's own signature).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from .spec import KERNELS, KernelSpec, Launch

MODULES = {"attention_scores": "scores", "select_tokens": "select", "sparse_verify": "verify"}


@dataclasses.dataclass(frozen=True)
class OpFamily:
    kernel: str  # template, perf-DB folder and search-space name
    launch: Callable[..., Launch]
    default_config: Callable[[Launch], dict]
    aot_launches: Callable[[str], list[Launch]]
    aot_kernels: Callable[[KernelSpec, dict], list]


def family(kernel: str) -> OpFamily:
    """The descriptor of `kernel` (one of spec.KERNELS)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    return importlib.import_module(f"dustin_kernels.ops.{MODULES[kernel]}").FAMILY
