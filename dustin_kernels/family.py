"""One descriptor per op family (FlashInfer's `JitSpec` idea): everything the tools need to know about a
kernel family comes from one object, `ops.<op>.FAMILY`, instead of copies kept by hand in the AOT
check, the tuner's workloads and the op.

- `launch(arch, ...) -> spec.Launch`: the spec and the problem size (the perf-DB key) of a call, from
  shapes; the op's launcher and `autotune.workloads.Workload.launch` both call it;
- `default_config(launch) -> dict`: the documented launch config when the perf DB has no entry;
- `aot_launches(arch) -> list[Launch]`: what `python -m dustin_kernels.aot` compiles (model shapes,
  the headline batch and context, their KV heads);
- `aot_kernels(spec, config) -> list[AotKernel]`: the jit functions with argument types
  (`AotKernel.of`: types by argument name from the rendered kernel's own signature), which
  `python -m dustin_kernels.aot` compiles for sm_80 / sm_90.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from .spec import KERNELS, KernelSpec, Launch

MODULES = {"attention_scores": "scores", "select_tokens": "select", "sparse_verify": "verify"}


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """One jit function of a rendered module with the argument types it is compiled for."""
    fn: object  # triton JITFunction
    signature: dict  # arg name -> "*fp16" | "*bf16" | "*fp32" | "*i32" | "i32" | "fp32" | "constexpr"
    constexprs: dict  # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple = ()  # int args taken as multiples of 16, as the JIT assumes of such values (row strides)

    @classmethod
    def of(cls, fn, types: dict, constexprs: dict, num_warps: int, num_stages: int, aligned=()) -> "AotKernel":
        """`fn` with the signature read from its own argument names: the `constexprs` given (those it
        takes), the other arguments typed by `types` (name -> type), "i32" where not named there."""
        constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
        return cls(fn, signature, constexprs, num_warps, num_stages, tuple(aligned))

    def attrs(self) -> dict:
        """Divisibility hints the JIT would derive at run time: pointers (torch allocations are 16-byte
        aligned) and the `aligned` ints; without them gathers are not vectorised and the report lies."""
        return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(self.fn.arg_names)
                if self.signature[name].startswith("*") or name in self.aligned}


@dataclasses.dataclass(frozen=True)
class OpFamily:
    """The descriptor of one op family (see the module docstring for each field)."""
    kernel: str  # template, perf-DB folder and search-space name
    launch: Callable[..., Launch]
    default_config: Callable[[Launch], dict]
    aot_launches: Callable[[str], list[Launch]]
    aot_kernels: Callable[[KernelSpec, dict], list[AotKernel]]


def family(kernel: str) -> OpFamily:
    """The descriptor of `kernel` (one of spec.KERNELS)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    return importlib.import_module(f"dustin_kernels.ops.{MODULES[kernel]}").FAMILY
