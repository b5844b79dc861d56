"""python -m dustin_kernels.autotune: tune the kernels on this GPU and write the perf DB.

    python -m dustin_kernels.autotune                              # the 'headline' grid, every kernel
    python -m dustin_kernels.autotune --kernel sparse_verify --shape qwen2.5-7b --batch 1 16 \\
        --context 8192 32768 --time-budget 600
    python -m dustin_kernels.autotune --shape 32,8,128 --grid models --resume
    python -m dustin_kernels.autotune --interpret --out /tmp/db     # CPU: the pipeline in Triton's interpreter

Buckets come from a grid of `autotune/grid.json` (--grid), with any of --shape/--batch/--context/
--budget/--window/--block-size/--dtype/--heads replacing the grid's values. Search spaces:
`autotune/<kernel>.json`. Without a CUDA GPU it stops, unless --interpret, which runs everything on
tiny shapes in Triton's interpreter and writes entries marked as not being performance figures.
Arguments, and that --out and --log-dir are writable, are checked before any tuning (exit status 2
with a one-line error); --resume drops a torn tail of the Optuna journal, saying so.
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import tempfile
from pathlib import Path

from ..shapes import PRESETS, AttentionShape
from ..spec import KERNELS


def _shape(text: str):
    if text in PRESETS:
        return PRESETS[text]
    try:
        q, kv, d = (int(x) for x in text.split(","))
    except ValueError:
        q = kv = d = 0
    if min(q, kv, d) < 1 or q % kv:
        raise argparse.ArgumentTypeError(f"expected a preset ({', '.join(PRESETS)}) or 'q_heads,kv_heads,head_dim' "
                                         f"of positive ints with q_heads a multiple of kv_heads, got {text!r}")
    return AttentionShape(q, kv, d)


def _at_least(lo: int, kind=int, power_of_two: bool = False):
    """argparse type: a number >= lo (a power of two when asked)."""
    what = f"a power-of-two int >= {lo}" if power_of_two else f"{'an int' if kind is int else 'a number'} >= {lo}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= lo or (power_of_two and value & (value - 1)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line on stderr, exit status 2 (argparse's default prints the long usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def _writable(folder: Path) -> None:
    """Create `folder` if missing and write a probe file there; raises OSError when that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe_"):
        pass


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m dustin_kernels.autotune", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS), help="kernel families (default: all)")
    p.add_argument("--workload", nargs="+", choices=["estimate", "lookahead", "select", "sparse", "dense"],
                   help="only these workloads (default: the grid's workloads of each kernel)")
    p.add_argument("--grid", help="grid of autotune/grid.json (default: headline; interpret with --interpret)")
    p.add_argument("--shape", nargs="+", type=_shape,
                   help="target model presets or explicit 'q_heads,kv_heads,head_dim' (lookahead runs on --draft)")
    p.add_argument("--batch", nargs="+", type=_at_least(1), help="batch sizes")
    p.add_argument("--context", nargs="+", type=_at_least(1), help="history lengths (tokens per sequence)")
    p.add_argument("--budget", type=_at_least(1), help="selected history blocks (select_tokens, sparse_verify)")
    p.add_argument("--window", type=_at_least(1), help="T, window queries of the verification step")
    p.add_argument("--block-size", type=_at_least(1, power_of_two=True), help="tokens per selection block")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="KV cache and query dtype")
    p.add_argument("--heads", type=_at_least(1), help="retrieval heads of attention_scores")
    p.add_argument("--draft", choices=sorted(PRESETS), help="draft model preset (the 'lookahead' workload's shape)")
    p.add_argument("--trials", type=_at_least(1),
                   help="measured configs per bucket at most (default 200; 3 with --interpret)")
    p.add_argument("--time-budget", type=_at_least(0, float), help="seconds for the whole run, shared by the buckets")
    p.add_argument("--patience", type=_at_least(1), default=40,
                   help="stop a bucket after this many trials without a 1%% gain")
    p.add_argument("--out", type=Path, help="perf_db folder to write (default: the package's perf_db)")
    p.add_argument("--log-dir", type=Path,
                   help="trial log and Optuna journal (default: $DUSTIN_CACHE_DIR/autotune/<device>)")
    p.add_argument("--resume", action="store_true", help="continue the studies of the journal in --log-dir")
    p.add_argument("--interpret", action="store_true", help="run in Triton's interpreter on CPU (pipeline test)")
    p.add_argument("--seed", type=_at_least(0), default=0, help="sampler and sweep-order seed")
    p.add_argument("--jobs", type=_at_least(1),
                   help="configs compiled and checked in parallel (default: min(8, CPUs); 1 with --interpret)")
    p.add_argument("--prepare-timeout", type=float,
                   help="seconds a batch of configs may take to compile and run once in the worker processes "
                        "(on a GPU, or with --jobs > 1; default 300); configs still running then are dropped as "
                        "'timeout' and the workers' stacks printed")
    p.add_argument("--sweep-limit", type=_at_least(0), default=200,
                   help="sweep every candidate when there are at most this many")
    p.add_argument("--no-aot", dest="aot", action="store_false", help="skip the ahead-of-time compile check")
    p.add_argument("--top", type=_at_least(1), default=3,
                   help="best configs re-measured in the final interleaved rounds")
    p.add_argument("--rounds", type=_at_least(1), default=5, help="interleaved rounds of the final re-measure")
    p.add_argument("--rep-ms", type=_at_least(1e-3, float), default=40.0,
                   help="do_bench repetition time per timing block (ms)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # a killed run says where it was
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is rendered and decorated
    import torch

    if not args.interpret and not torch.cuda.is_available():
        print("python -m dustin_kernels.autotune: no CUDA GPU here; tuning needs one. Run it on each GPU model "
              "you serve on, or use --interpret to run the pipeline on CPU in Triton's interpreter (tiny "
              "shapes; the entries it writes are not performance figures).", file=sys.stderr)
        return 2
    from .. import dispatch, perf_db
    from . import measure, space, tuner
    from .workloads import from_grid

    grid = space.load_grid()
    args.grid = args.grid or ("interpret" if args.interpret else "headline")
    if args.grid not in grid["grids"]:
        parser().error(f"--grid: expected one of {sorted(grid['grids'])}, got {args.grid!r}")
    try:
        planned = from_grid(grid, args.grid, args.kernel, workloads=args.workload, shapes=args.shape,
                            batches=args.batch, contexts=args.context, budget=args.budget, window=args.window,
                            block_size=args.block_size, dtype=args.dtype, heads=args.heads, draft=args.draft)
    except ValueError as exc:
        parser().error(str(exc))
    if not planned:
        parser().error("no workload left: --workload names none of the chosen kernels' workloads")
    if args.prepare_timeout is not None and not args.prepare_timeout > 0:
        parser().error(f"--prepare-timeout: expected seconds > 0, got {args.prepare_timeout}")
    arch = dispatch.arch_for(torch.device("cpu") if args.interpret else torch.device("cuda"))
    slug = dispatch.device_slug(arch)
    out, log_dir = args.out or perf_db.root(), args.log_dir or tuner.default_log_dir(slug)
    for flag, folder in (("--out", out), ("--log-dir", log_dir)):
        try:
            _writable(folder)
        except OSError as exc:
            parser().error(f"{flag} {folder}: not a writable folder ({type(exc).__name__}: {exc.strerror or exc})")
    for path in {perf_db.path_for(out, w.kernel, arch, slug) for w in planned}:
        if path.exists():  # the run merges its entries into it: unreadable is an error now, not after tuning
            try:
                perf_db.read(path)
            except perf_db.PerfDBError as exc:
                parser().error(f"--out: {exc}")
    options = tuner.Options(
        workloads=planned, out=out, log_dir=log_dir,
        trials=args.trials or (3 if args.interpret else 200), time_budget=args.time_budget,
        patience=args.patience, resume=args.resume, interpret=args.interpret, seed=args.seed,
        jobs=args.jobs or (1 if args.interpret else min(8, os.cpu_count() or 1)), sweep_limit=args.sweep_limit,
        prepare_timeout=measure.PREPARE_TIMEOUT if args.prepare_timeout is None else args.prepare_timeout,
        aot=args.aot, top=args.top,
        rounds=args.rounds, rep_ms=args.rep_ms)
    return tuner.run(options)


if __name__ == "__main__":
    sys.exit(main())
