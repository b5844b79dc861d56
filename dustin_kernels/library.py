"""The ops as `torch.ops.dustin_kernels.<name>` custom ops, for torch.compile, torch.export and CUDA graphs.

Each custom op is an op's unchecked implementation: it takes its outputs as arguments, writes them, and
returns nothing (FlashInfer's pattern), so its fake implementation has nothing to compute and a traced
graph holds one opaque op whose output shapes come from the buffers the public function allocated. The
public functions check their arguments, allocate the outputs, and call the implementation directly in
eager mode (the dispatcher costs about 30 us per call) and through the custom op while torch.compile /
torch.export trace (`torch.compiler.is_compiling()`).
"""
from __future__ import annotations

import functools

import torch

NAMESPACE = "dustin_kernels"


def _writes_only(*args, **kwargs) -> None:
    """Fake implementation: the op only writes its output arguments."""


def custom_op(name: str, mutates_args: tuple[str, ...]):
    """Decorator: registers `fn` (type-annotated, returning None) as `torch.ops.dustin_kernels.<name>`, which
    writes `mutates_args`; returns a caller that runs `fn` in eager mode and the op while compiling."""
    def register(fn):
        torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates_args).register_fake(_writes_only)
        op = getattr(getattr(torch.ops, NAMESPACE), name).default

        @functools.wraps(fn)
        def call(*args) -> None:
            (op if torch.compiler.is_compiling() else fn)(*args)
        return call
    return register
