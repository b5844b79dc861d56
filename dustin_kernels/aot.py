"""Ahead-of-time compile check: render, compile for sm_80 / sm_90 without a GPU, report resources.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs the whole pipeline down to a
cubin (ptxas ships in the triton wheel); `cuobjdump -res-usage` then reports registers, spill stack
and shared memory. Each op family's descriptor (`family.family(kernel)`, `ops/<op>.py`'s `FAMILY`)
gives the launches to check for an arch (`aot_launches`: the model shapes of `dustin_kernels.shapes.PRESETS`
at the headline batch and context, the window and block sizes it supports), their default configs
(`default_config(launch)`) and its jit functions with argument types (`aot_kernels`).

    python -m dustin_kernels.aot                 # every kernel family, default configs, model shapes
    python -m dustin_kernels.aot sparse_verify --json report.json
    python -m dustin_kernels.aot --quick         # the first two specs per kernel and arch (the test)

A row is printed as each spec compiles ([i/N]: the full report takes minutes). The exit status is 1
when a kernel fails to compile or spills, except the known spills of `KNOWN_SPILLS`, which are
reported as such and do not fail the run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .family import AotKernel, family
from .spec import KERNELS, KernelSpec

CAPABILITY = {"sm80": 80, "sm90": 90}
KNOWN_SPILLS: dict = {}  # (spec uri, function) -> why it is accepted (README, "AOT report"); none today


@dataclasses.dataclass(frozen=True)
class AotResult:
    uri: str
    function: str
    config: dict
    registers: int
    spill_bytes: int  # local-memory stack frame + spill stores
    shared_bytes: int
    error: str = ""


def _cuobjdump() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack + spill bytes, static shared bytes) of the single kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout

    def field(name):
        found = re.search(rf"{name}:(\d+)", text)
        return int(found.group(1)) if found else 0

    return field("REG"), field("STACK") + field("LOCAL"), field("SHARED")


def compile_kernel(kernel: AotKernel, arch: str):
    """Compile for `arch` ('sm80' | 'sm90'); returns triton's CompiledKernel (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel.fn, kernel.signature, kernel.constexprs, kernel.attrs())
    target = GPUTarget("cuda", CAPABILITY[arch], 32)
    options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
    return triton.compile(source, target=target, options=options)


def check(spec: KernelSpec, config: dict, aot_kernels) -> list[AotResult]:
    """Compile every kernel of `spec` with `config`; a failed compile becomes a result with `error`."""
    results = []
    for kernel in aot_kernels(spec, config):
        name = kernel.fn.__name__
        try:
            compiled = compile_kernel(kernel, spec.arch)
            regs, spill, smem = resource_usage(compiled.asm["cubin"])
            smem = max(smem, compiled.metadata.shared)
            results.append(AotResult(spec.uri(), name, config, regs, spill, smem))
        except Exception as exc:  # a config that fails to compile is a verdict, not a crash
            results.append(AotResult(spec.uri(), name, config, 0, 0, 0, f"{type(exc).__name__}: {exc}"[:500]))
    return results


def launches(kernels=KERNELS, archs=tuple(CAPABILITY), limit: int | None = None) -> list:
    """(family, launch) of every launch checked: the first `limit` of each kernel family and arch."""
    return [(family(kernel), launch) for kernel in kernels for arch in archs
            for launch in family(kernel).aot_launches(arch)[:limit]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dustin_kernels.aot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", nargs="*", help=f"kernel families, of {list(KERNELS)} (default: all)")
    parser.add_argument("--arch", nargs="+", choices=list(CAPABILITY), default=list(CAPABILITY))
    parser.add_argument("--quick", action="store_true", help="only the first two specs per kernel and arch")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.kernel) - set(KERNELS)
    if unknown:
        parser.error(f"kernel: expected some of {list(KERNELS)}, got {sorted(unknown)}")
    os.environ.pop("TRITON_INTERPRET", None)
    rows, failed, known = [], 0, 0
    todo = launches(args.kernel or KERNELS, args.arch, limit=2 if args.quick else None)
    print(f"{'':10}{'spec':58} {'function':18} {'regs':>5} {'spill B':>8} {'smem B':>8}  config", flush=True)
    for i, (fam, launch) in enumerate(todo, 1):
        for r in check(launch.spec, fam.default_config(launch), fam.aot_kernels):
            why = KNOWN_SPILLS.get((r.uri, r.function)) if r.spill_bytes and not r.error else None
            rows.append({**dataclasses.asdict(r), "known_spill": why or ""})
            known += bool(why)
            failed += bool(r.error or r.spill_bytes) and not why
            cfg = " ".join(f"{k}={v}" for k, v in sorted(r.config.items()))
            note = (f"  ERROR {r.error}" if r.error else f"  SPILLS (known: {why})" if why
                    else "  SPILLS" if r.spill_bytes else "")
            print(f"{f'[{i}/{len(todo)}]':10}{r.uri:58} {r.function:18} {r.registers:5} {r.spill_bytes:8} "
                  f"{r.shared_bytes:8}  {cfg}{note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    print(f"{len(rows)} kernels compiled, {failed} failed or spilled" + (f", {known} known spills (not failures)"
                                                                          if known else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
