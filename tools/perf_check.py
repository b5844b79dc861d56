"""The perf-regression check of the perf DB.

CPU part (CI, no GPU needed):
  1. every file under the DB is a regular file, validates against perf_db/schema.json, sits at
     <kernel>/<arch>/<device>.json matching its own fields and its entries' uris, and every entry's
     config is within its kernel's search space (autotune/<kernel>.json: values and constraints);
  2. every GPU file covers the `required` grids of autotune/grid.json (its kernel's workloads), unless
     every entry of it is stale (then the whole file is to be retuned: a note);
  3. every stored GPU config still compiles for its arch (dustin_kernels.aot, no spills counted,
     errors and shared memory above the arch's limit fail);
  stale entries (tuned for another template version) are reported, not failed.
GPU part (--gpu): the entries of this GPU's files are re-measured in one run, interleaved: the DB
winner, the op's default rule and, where the entry has one, the baseline (dense_verify). A ratio
winner/default or winner/baseline more than --threshold (5%) above the stored ratio is a regression
if a rerun of that entry confirms it.

    python tools/perf_check.py                  # CPU part, the package's perf_db
    python tools/perf_check.py --db DIR --gpu --json report.json
Exit status: 0 clean, 1 a check failed, 2 bad arguments (e.g. --db not a folder).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the AOT and GPU checks compile real GPU code

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dustin_kernels import codegen, perf_db  # noqa: E402
from dustin_kernels.autotune import space  # noqa: E402
from dustin_kernels.autotune.workloads import Workload, from_grid  # noqa: E402
from dustin_kernels.spec import KERNELS, KernelSpec  # noqa: E402


def check_files(db: Path) -> tuple[dict, list[str]]:
    """({path: doc} of the valid files, problems)."""
    problems, docs = [], {}
    known = set(perf_db.files(db))
    for path in sorted(db.rglob("*.json")):
        if path.name != "schema.json" and path not in known:
            problems.append(f"{path}: not at <kernel>/<arch>/<device>.json")
    for path in sorted(known):
        try:
            doc = perf_db.read(path)
        except perf_db.PerfDBError as exc:
            problems.append(str(exc))
            continue
        kernel, arch, device = path.parent.parent.name, path.parent.name, path.stem
        if (doc["kernel"], doc["arch"], doc["device"]) != (kernel, arch, device):
            problems.append(f"{path}: holds {doc['kernel']}/{doc['arch']}/{doc['device']}, its path says "
                            f"{kernel}/{arch}/{device}")
            continue
        bad = []
        for key, entry in doc["entries"].items():
            try:
                spec = KernelSpec.from_uri(perf_db.parse_key(key)[0])
            except ValueError as exc:
                bad.append(f"{path}: entry {key} does not name a kernel spec ({exc})")
                continue
            if (spec.kernel, spec.arch) != (kernel, arch):
                bad.append(f"{path}: entry {key} is not a {kernel} {arch} spec")
                continue
            problems += [f"{path}: entry {key} config: {e}" for e in perf_db.config_errors(key, entry["config"])]
        problems += bad
        if not bad:  # the later checks parse every entry's spec
            docs[path] = doc
    return docs, problems


def required_keys(kernel: str, arch: str) -> set[str]:
    """DB keys the required grids of autotune/grid.json give for a kernel on an arch."""
    grid = space.load_grid()
    return {w.db_key(arch) for name, g in grid["grids"].items() if g["required"]
            for w in from_grid(grid, name, [kernel])}


def check_coverage(docs: dict) -> list[str]:
    """Required buckets a GPU file lacks are problems, except in a file whose every entry is stale: tuned
    for an older template, it is to be retuned as a whole, the new template's specs with it (a note).
    A device with files for some kernels but not others gets a note too."""
    problems = []
    for path, doc in docs.items():
        if doc["arch"] == "interp":
            continue
        missing = sorted(required_keys(doc["kernel"], doc["arch"]) - set(doc["entries"]))
        if not missing:
            continue
        text = (f"{path}: {len(missing)} buckets of the required grids are not tuned: "
                + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        if set(perf_db.stale_keys(doc, codegen.template_hash(doc["kernel"]))) == set(doc["entries"]):
            print(f"note: {text} (every entry is stale: retune the file)")
        else:
            problems.append(text)
    devices = {(doc["arch"], doc["device"]) for doc in docs.values() if doc["arch"] != "interp"}
    for arch, device in sorted(devices):
        for kernel in sorted(set(KERNELS) - {d["kernel"] for d in docs.values() if (d["arch"], d["device"]) ==
                                              (arch, device)}):
            print(f"note: no {kernel} file for {device} ({arch}): its ops use the default rule (tune it)")
    return problems


def _aot_task(task):
    from dustin_kernels.autotune.measure import SMEM_LIMIT, aot_verdict

    spec = KernelSpec.from_uri(task[0])
    try:
        return aot_verdict(spec, task[1], SMEM_LIMIT[spec.arch])
    except Exception as exc:  # the op's aot_kernels rejected the stored config
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}


def check_compiles(docs: dict, jobs: int) -> list[str]:
    tasks = sorted({(perf_db.parse_key(key)[0], json.dumps(e["config"], sort_keys=True)): (path, key)
                    for path, doc in docs.items() if doc["arch"] != "interp"
                    for key, e in doc["entries"].items()}.items())
    if not tasks:
        return []
    print(f"compiling {len(tasks)} stored configs ahead of time ({jobs} jobs)", flush=True)
    work = [(uri, json.loads(config)) for (uri, config), _ in tasks]
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            verdicts = list(pool.map(_aot_task, work))
    else:
        verdicts = [_aot_task(t) for t in work]
    return [f"{path}: entry {key} config {config} does not compile: {v['error']}"
            for ((_, config), (path, key)), v in zip(tasks, verdicts) if not v["ok"]]


def report_stale(docs: dict) -> None:
    for path, doc in docs.items():
        stale = perf_db.stale_keys(doc, codegen.template_hash(doc["kernel"]))
        if stale:
            print(f"note: {path}: {len(stale)} of {len(doc['entries'])} entries are stale (tuned for another "
                  f"version of templates/{doc['kernel']}.py.j2; still used, retune)")


# --- GPU part ---------------------------------------------------------------------------------------

def remeasure(timer, device, key: str, entry: dict, threshold: float) -> dict:
    """One interleaved measurement of an entry: ratios now and in the DB, and whether they regressed."""
    from dustin_kernels import dispatch
    from dustin_kernels.autotune.measure import runner
    from dustin_kernels.autotune.workloads import build

    w = Workload.from_json(entry["workload"])
    problem = build(w, device)
    with dispatch.record() as calls:
        problem.call()
    launch, default = calls[0]
    fns = {"winner": timer.prepare(runner(problem, launch.spec, entry["config"])),
           "default": timer.prepare(runner(problem, launch.spec, default(launch)))}
    baseline = problem.baseline()
    if baseline is not None and "baseline" in entry:
        fns["baseline"] = timer.prepare(baseline[1])
    t = {name: timing.median_us for name, timing in timer.interleaved(fns).items()}
    row = {"key": key, "winner_us": t["winner"], "default_us": t["default"], "vs_default": t["winner"] / t["default"],
           "vs_default_db": entry["median_us"] / entry["default"]["median_us"]}
    regressed = row["vs_default"] > row["vs_default_db"] * (1 + threshold)
    if "baseline" in fns:
        row.update(baseline_us=t["baseline"], vs_baseline=t["winner"] / t["baseline"],
                   vs_baseline_db=entry["median_us"] / entry["baseline"]["median_us"])
        regressed |= row["vs_baseline"] > row["vs_baseline_db"] * (1 + threshold)
    row["regressed"] = bool(regressed)
    return row


def gpu_check(docs: dict, threshold: float) -> tuple[list, list[str]]:
    import torch

    from dustin_kernels import dispatch
    from dustin_kernels.autotune.measure import Timer

    if not torch.cuda.is_available():
        return [], ["--gpu: no CUDA GPU here"]
    device = torch.device("cuda", torch.cuda.current_device())
    arch = dispatch.arch_for(device)
    slug = dispatch.device_slug(arch, device)
    mine = {p: d for p, d in docs.items() if d["arch"] == arch and d["device"] == slug}
    if not mine:
        print(f"--gpu: no DB file for {slug} ({arch}); nothing to re-measure")
        return [], []
    timer = Timer(device)
    rows, problems = [], []
    for path, doc in mine.items():
        for key, entry in sorted(doc["entries"].items()):
            row = remeasure(timer, device, key, entry, threshold)
            if row["regressed"]:
                print(f"{key}: ratio above the DB by more than {threshold:.0%}; rerunning to confirm", flush=True)
                row = remeasure(timer, device, key, entry, threshold)
                if row["regressed"]:
                    problems.append(f"{path}: {key} regressed: winner/default {row['vs_default']:.3f} "
                                    f"(DB {row['vs_default_db']:.3f})"
                                    + (f", winner/baseline {row['vs_baseline']:.3f} (DB {row['vs_baseline_db']:.3f})"
                                       if "vs_baseline" in row else ""))
            rows.append(row)
            print(f"{key}: winner {row['winner_us']:.2f} us, x{row['vs_default']:.3f} of default "
                  f"(DB x{row['vs_default_db']:.3f})"
                  + (f", x{row['vs_baseline']:.3f} of baseline (DB x{row['vs_baseline_db']:.3f})"
                     if "vs_baseline" in row else "") + ("  REGRESSED" if row["regressed"] else ""), flush=True)
    return rows, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tools/perf_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=None, help="perf_db folder (default: the package's)")
    parser.add_argument("--gpu", action="store_true", help="also re-measure this GPU's entries")
    parser.add_argument("--threshold", type=float, default=0.05, help="ratio regression that fails (default 0.05)")
    parser.add_argument("--no-aot", dest="aot", action="store_false", help="skip the compile check")
    parser.add_argument("--no-coverage", dest="coverage", action="store_false",
                        help="skip the coverage check (a DB tuned for other buckets than the required grids)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel AOT compiles")
    parser.add_argument("--json", type=Path, help="write the findings (and GPU rows) here")
    args = parser.parse_args(argv)
    db = args.db or perf_db.root()
    if not db.is_dir():
        print(f"perf_check: error: --db {db}: not a folder", file=sys.stderr)
        return 2
    docs, problems = check_files(db)
    entries = sum(len(d["entries"]) for d in docs.values())
    print(f"{db}: {len(docs)} DB files, {entries} entries, {len(problems)} invalid", flush=True)
    problems += check_coverage(docs) if args.coverage else []
    if args.aot:
        problems += check_compiles(docs, args.jobs)
    report_stale(docs)
    rows = []
    if args.gpu:
        rows, gpu_problems = gpu_check(docs, args.threshold)
        problems += gpu_problems
    for p in problems:
        print(f"FAIL {p}")
    if args.json:
        args.json.write_text(json.dumps({"db": str(db), "problems": problems, "gpu": rows}, indent=1) + "\n")
    print("perf_check: " + ("OK" if not problems else f"{len(problems)} problems"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
