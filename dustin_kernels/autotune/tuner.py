"""One tuning run: plan the buckets, search each, re-measure the best, write the perf DB.

A bucket is one DB key (spec uri, batch bucket, context bucket, KV heads where the op's config
depends on them) of one GPU; workloads that map to
the same key (sparse_verify reads `budget` blocks whatever the history length) are tuned once. Per
bucket: check the workload's predicted dispatch key against the op's real `config_for` call,
enumerate the space's candidates, search them (`search.Search`, measured by `measure`), re-measure
the best few with the default rule and the baseline in interleaved rounds, and write the winner
(atomically, merged into the file). Every trial is a JSON line in `<log-dir>/trials.jsonl`; Optuna
studies live in `<log-dir>/journal.log` (JournalStorage), which `--resume` continues.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from .. import codegen, dispatch, perf_db
from ..measurement import copy_gbs
from . import measure, search, space
from .workloads import Workload, build


@dataclasses.dataclass
class Options:
    workloads: list  # [Workload]
    out: Path  # perf_db folder written
    log_dir: Path
    trials: int = 200  # measured configs per bucket at most
    time_budget: float | None = None  # seconds for the whole run
    patience: int = 40  # stop a bucket after this many trials without a 1% gain
    resume: bool = False
    interpret: bool = False
    seed: int = 0
    jobs: int = 1  # configs prepared (compiled, checked) in parallel
    prepare_timeout: float = measure.PREPARE_TIMEOUT  # seconds a batch's preparation may take
    sweep_limit: int = 200
    aot: bool = True
    top: int = 3  # best configs re-measured at the end
    rounds: int = 5  # interleaved rounds of the final re-measure
    rep_ms: float = 40.0  # do_bench repetition time per timing block


class Progress:
    """Trial n/N and the best so far: a tqdm bar on a terminal (where tqdm is installed), else a line
    at the first trial, every 10th and each new best (logs stay readable)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.best = label, total, None
        self.bar = None
        if sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="trial", dynamic_ncols=True, file=sys.stdout)
            except ImportError:
                pass

    def update(self, trial: search.Trial, n: int) -> None:
        if trial.value is not None and (self.best is None or trial.value < self.best):
            self.best = trial.value
        best = f"best {self.best:.2f} us" if self.best is not None else "no valid config yet"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(best)
        elif n == 1 or n % 10 == 0 or trial.value == self.best:
            print(f"  {self.label}: trial {n}/{self.total}, {best}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class TrialLog:
    """Append-only JSON-lines log of every trial and bucket result."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")

    def write(self, **row) -> None:
        self.file.write(json.dumps({"time": perf_db.utc_now(), **row}, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plan(workloads: list, arch: str) -> list:
    """The workloads to tune, one per DB key (the first of those sharing a key)."""
    seen, buckets = set(), []
    for w in workloads:
        key = w.db_key(arch)
        if key not in seen:
            seen.add(key)
            buckets.append(w)
    return buckets


def _seeds(doc: dict | None, key: str) -> list:
    """The current winner of `key`, then the winners of the same uri's other buckets, nearest first."""
    if not doc:
        return []
    uri, batch, context, kv_heads = perf_db.parse_key(key)
    near = []
    for other, entry in doc["entries"].items():
        o_uri, o_batch, o_context, o_kv_heads = perf_db.parse_key(other)
        if o_uri == uri and o_kv_heads == kv_heads:
            distance = abs(math.log2(o_batch / batch)) + abs(math.log2(o_context / context))
            near.append((distance, other, entry["config"]))
    return [config for _, _, config in sorted(near)][:5]


def _switches_flipped(config: dict, params: dict) -> list:
    """`config` with each two-valued parameter (an algorithm switch, e.g. ONE_PASS) flipped: one seed
    each, so that a short run measures every algorithm at least once."""
    return [{**config, name: next(v for v in values if v != config[name])}
            for name, values in params.items() if len(values) == 2]


class Tuner:
    def __init__(self, options: Options):
        self.o = options
        self.device = torch.device("cpu") if options.interpret else torch.device("cuda", torch.cuda.current_device())
        self.arch = dispatch.arch_for(self.device)
        self.slug = dispatch.device_slug(self.arch, self.device)
        self.timer = measure.Timer(self.device, rep_ms=options.rep_ms)
        self.env = measure.environment(self.device, self.timer.monitor)
        self.copy_gbs = copy_gbs(self.device) if self.device.type == "cuda" else None  # interpreter: no figure
        self.log = TrialLog(options.log_dir / "trials.jsonl")
        self.journal = options.log_dir / "journal.log"
        if self.journal.exists() and not options.resume:  # a fresh run keeps the old journal aside
            shutil.move(self.journal, self.journal.with_name(f"journal.{int(self.journal.stat().st_mtime)}.log"))
        elif self.journal.exists():
            repaired = search.repair_journal(self.journal)
            if repaired:
                print(repaired, file=sys.stderr, flush=True)
        self.prepare = measure.Preparer(self.device, self.arch, jobs=options.jobs, use_aot=options.aot,
                                        timeout=options.prepare_timeout)
        self.trials_by_kernel: dict = {}
        self.sampler_by_kernel: dict = {}

    def close(self) -> None:
        self.prepare.close()
        self.log.close()

    # --- one bucket ---------------------------------------------------------------------------------
    def tune(self, w: Workload, deadline: float | None) -> str:
        """Tune one bucket; returns 'written', 'skipped' (resumed, already done) or why nothing was written."""
        o = self.o
        predicted = w.launch(self.arch)
        key = predicted.key()
        study = search.open_study(self.journal, f"{self.slug}/{key}", o.seed)
        if o.resume and study is not None and study.user_attrs.get("done"):
            print(f"{key}: done in the resumed run, skipped")
            return "skipped"
        problem = build(w, self.device, seed=0)
        with dispatch.record() as calls, warnings.catch_warnings():
            warnings.simplefilter("ignore", dispatch.PerfDBWarning)  # this call only learns the dispatch key
            problem.call()
        launch, default = self._check_dispatch(calls, predicted)
        spec, default_config = launch.spec, default(launch)
        kernel_space = space.load_space(spec.kernel)
        candidates = kernel_space.enumerate_configs(space.variables(launch))
        path = perf_db.path_for(o.out, spec.kernel, self.arch, self.slug)
        doc = perf_db.read(path) if path.exists() else None
        seeds = _seeds(doc, key) + [default_config] + _switches_flipped(default_config, kernel_space.params)
        print(f"{key}: {w.label()}; {len(candidates)} candidates of {kernel_space.size}", flush=True)

        first = True

        def measure_batch(configs):
            nonlocal first
            # the first batch (the seeds) is prepared whatever the deadline, so the bucket gets a figure
            prepared = self.prepare(w, spec, configs, deadline=None if first else deadline)
            first = False
            trials = []
            for config, prep in zip(configs, prepared):
                trial = search.Trial(config, None, prep["status"], prep["detail"])
                if prep["status"] == "ok":
                    try:
                        timing = self.timer.time(self.timer.prepare(measure.runner(problem, spec, config)))
                    except Exception as exc:  # e.g. out of resources at this problem's size
                        trial.status, trial.detail["error"] = "launch", f"{type(exc).__name__}: {exc}"[:800]
                    else:
                        trial.detail.update(iqr_us=timing.iqr_us, samples=timing.samples)
                        if timing.throttle:
                            trial.status, trial.detail["throttle"] = "throttled", timing.throttle
                        else:
                            trial.value = timing.median_us
                self.log.write(bucket=key, config=config, median_us=trial.value, status=trial.status,
                               detail=trial.detail)
                trials.append(trial)
            return trials

        progress = Progress(key, min(o.trials, len(candidates)))
        finder = search.Search(candidates, kernel_space.params, seeds=seeds, max_trials=o.trials, patience=o.patience,
                               sweep_limit=o.sweep_limit, seed=o.seed, parallel=o.jobs, study=study,
                               deadline=deadline, on_trial=progress.update)
        try:
            outcome = finder.run(measure_batch)
        finally:
            progress.close()
        self.trials_by_kernel[spec.kernel] = self.trials_by_kernel.get(spec.kernel, 0) + len(outcome.trials)
        self.sampler_by_kernel.setdefault(spec.kernel, set()).add(outcome.strategy)
        best = outcome.best(o.top)
        failed = {t.status for t in outcome.trials if t.value is None}
        print(f"{key}: {outcome.strategy}, {len(outcome.trials)} trials (stop: {outcome.stop}"
              + (f", {outcome.resumed} resumed" if outcome.resumed else "")
              + (f"; failures: {sorted(failed)}" if failed else "") + ")", flush=True)
        if not best:
            self.log.write(bucket=key, result="no valid config", stop=outcome.stop)
            return "no valid config"
        entry = self._final(problem, spec, best, default_config, outcome, w)
        if entry is None:
            self.log.write(bucket=key, result="throttled")
            return "throttled"
        meta = self._meta(spec.kernel)
        perf_db.update(path, spec.kernel, self.arch, self.slug, meta, {key: entry})
        if study is not None:
            study.set_user_attr("done", True)
        self.log.write(bucket=key, result="written", entry=entry, path=str(path))
        speedup = entry["default"]["median_us"] / entry["median_us"]
        print(f"{key}: {entry['median_us']:.2f} us ({entry['gbs']:.0f} GB/s"
              + (f", {entry['bw_fraction']:.0%} of copy" if entry["bw_fraction"] else "")
              + f"), default {entry['default']['median_us']:.2f} us ({speedup:.2f}x) -> {path}", flush=True)
        return "written"

    def _check_dispatch(self, calls: list, predicted):
        """The op's real config_for call must be the workload's predicted launch (else Workload.launch is
        stale); returns (the real launch, the op's default rule)."""
        if len({launch.spec for launch, _ in calls}) != 1:
            raise RuntimeError(f"{predicted.spec.kernel}: expected one spec per call of the op, got "
                               f"{[launch.spec for launch, _ in calls]}")
        real, default = calls[0]
        if real.key() != predicted.key():
            raise RuntimeError(f"workloads.py predicts the DB key {predicted.key()} but the op dispatches "
                               f"{real.key()}; update Workload.launch")
        return real, default

    def _final(self, problem, spec, best: list, default_config: dict, outcome, w: Workload) -> dict | None:
        """Interleaved re-measure of the best few, the default rule and the baseline; the entry, or None
        when the rounds stayed throttled."""
        configs = {f"c{i}": t.config for i, t in enumerate(best)}
        default_name = next((name for name, c in configs.items() if c == default_config), None)
        if default_name is None:
            default_name, configs["default"] = "default", default_config
        fns = {name: self.timer.prepare(measure.runner(problem, spec, c)) for name, c in configs.items()}
        baseline = problem.baseline()
        if baseline is not None:
            fns["baseline"] = self.timer.prepare(baseline[1])
        timings = self.timer.interleaved(fns, rounds=self.o.rounds)
        if any(t.throttle for t in timings.values()):
            return None
        ranked = sorted((timings[name].median_us, name) for name in configs)
        winner = ranked[0][1]
        runner_up = ranked[1][1] if len(ranked) > 1 else None
        gbs = w.bytes_moved() / timings[winner].median_us / 1e3
        entry = {
            "config": configs[winner],
            "median_us": round(timings[winner].median_us, 3),
            "iqr_us": round(timings[winner].iqr_us, 3),
            "gbs": round(gbs, 2),
            "bw_fraction": round(gbs / self.copy_gbs, 4) if self.copy_gbs else None,
            "runner_up": {"config": configs[runner_up], "median_us": round(timings[runner_up].median_us, 3)}
            if runner_up else None,
            "default": {"config": default_config, "median_us": round(timings[default_name].median_us, 3)},
            "template_hash": codegen.template_hash(spec.kernel),
            "date": perf_db.utc_now(),
            "trials": max(1, len(outcome.trials)),
            "sampler": outcome.strategy,
            "workload": w.to_json(),
            "interpret": self.o.interpret,
        }
        if baseline is not None:
            entry["baseline"] = {"name": baseline[0], "median_us": round(timings["baseline"].median_us, 3)}
        return entry

    def _meta(self, kernel: str) -> dict:
        meta = {**self.env, "template_hash": codegen.template_hash(kernel), "date": perf_db.utc_now(),
                "sampler": "+".join(sorted(self.sampler_by_kernel.get(kernel, {"sweep"}))), "seed": self.o.seed,
                "trials": self.trials_by_kernel.get(kernel, 0), "interpret": self.o.interpret,
                "copy_gbs": round(self.copy_gbs, 1) if self.copy_gbs else None}
        if self.o.interpret:
            meta["note"] = "Triton interpreter run on CPU: times are not performance figures"
        return meta


def run(options: Options) -> int:
    """Tune every planned bucket; 0 when each was written (or resumed as done), 1 otherwise."""
    if options.interpret and not dispatch.interpreter_enabled():
        raise RuntimeError("--interpret needs TRITON_INTERPRET=1 set before triton is imported "
                           "(python -m dustin_kernels.autotune --interpret sets it)")
    tuner = Tuner(options)
    buckets = plan(options.workloads, tuner.arch)
    print(f"tuning {len(buckets)} buckets on {tuner.env['gpu_name']} ({tuner.arch}, file {tuner.slug}.json) "
          f"into {options.out}; trial log {options.log_dir / 'trials.jsonl'}"
          + (f"; copy bandwidth {tuner.copy_gbs:.0f} GB/s" if tuner.copy_gbs else ""), flush=True)
    start = time.monotonic()
    results = {}
    try:
        for i, w in enumerate(buckets):
            deadline = None
            if options.time_budget is not None:
                left = options.time_budget - (time.monotonic() - start)
                deadline = time.monotonic() + max(0.0, left) / (len(buckets) - i)
            key = w.db_key(tuner.arch)
            try:
                results[key] = tuner.tune(w, deadline)
            except Exception as exc:  # one broken bucket does not end the run; it is reported at the end
                traceback.print_exc()
                print(f"{key}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                tuner.log.write(bucket=key, result="error", error=str(exc))
                results[key] = f"error: {exc}"
    finally:
        tuner.close()
    bad = {k: v for k, v in results.items() if v not in ("written", "skipped")}
    print(f"done in {time.monotonic() - start:.0f} s: {len(results) - len(bad)} of {len(results)} buckets written"
          + "".join(f"\n  NOT WRITTEN {k}: {v}" for k, v in bad.items()), flush=True)
    return 1 if bad else 0


def default_log_dir(slug: str) -> Path:
    return codegen.cache_dir().parent / "autotune" / slug
