"""The search over one bucket's candidate configs, independent of how a config is measured.

Strategy: a sweep (seeds first, then the rest in a seeded random order) when the candidates are at
most `sweep_limit`; otherwise Optuna's TPE sampler over the parameters' values, with the constraint
that a proposal is a candidate and measured without failing (`constraints_func`), seeded with
`enqueue_trial` (current winner, neighbouring buckets' winners, default rule). Without optuna a
random-order sweep stands in for TPE. Stops after `max_trials` measured configs, after `patience`
measured configs without a `min_gain` (1%) improvement on the best, when the candidates run out,
or at `deadline`. Trials are asked `parallel` at a time (so they can be compiled in parallel) and,
with a `storage`, recorded in an Optuna study so that a rerun with the same study continues it. The
first batch holds only the seeds (known to compile, quick to prepare) and is measured whatever the
deadline, so a bucket always has a figure. A trial the measure returns with status "cut" (its
preparation was cut short by the deadline) was not measured: it is neither recorded nor kept by the
study, and a resumed run may ask for it again.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

PENALTY = 1e12  # value told to Optuna for infeasible or failed trials (they are also flagged infeasible)
CUT = "cut"  # status of a trial the deadline left unmeasured


def config_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


@dataclasses.dataclass
class Trial:
    config: dict
    value: float | None  # median microseconds; None when the config failed (see status)
    status: str = "ok"  # "ok" or why it failed: "compile", "launch", "wrong", "throttled", ...
    detail: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Outcome:
    trials: list  # every measured Trial, in order (resumed ones first)
    strategy: str  # "sweep" | "tpe" | "random"
    stop: str  # "exhausted" | "trials" | "patience" | "time"
    resumed: int = 0

    def best(self, k: int = 1) -> list:
        """The k fastest successful trials, fastest first."""
        return sorted((t for t in self.trials if t.value is not None), key=lambda t: t.value)[:k]


def _optuna():
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(journal, name: str, seed: int):
    """An Optuna study in a JournalStorage file (created, or loaded to resume), in memory when `journal`
    is None; None without optuna."""
    optuna = _optuna()
    if optuna is None:
        return None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # Optuna >= 5 reads constraints set on the trial; older releases call constraints_func
    legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": _constraints}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **legacy)
    storage = JournalStorage(JournalFileBackend(str(journal))) if journal is not None else None
    return optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize",
                               load_if_exists=True)


def repair_journal(path: Path) -> str | None:
    """Keep the longest prefix of whole JSON lines of an Optuna journal file (a run killed mid-write leaves
    a torn record, which makes every later read fail); the damaged file is kept beside it as
    `<name>.torn`. Returns what was done, or None when the file was whole."""
    data = Path(path).read_bytes()
    good = records = 0
    for line in data.splitlines(keepends=True):
        try:
            json.loads(line)
        except ValueError:
            break
        if not line.endswith(b"\n"):
            break
        good, records = good + len(line), records + 1
    if good == len(data):
        return None
    aside = Path(path).with_name(Path(path).name + ".torn")
    shutil.copyfile(path, aside)
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_bytes(data[:good])
    os.replace(tmp, path)
    return (f"{path}: torn Optuna journal: kept its first {records} records, dropped the {len(data) - good} bytes "
            f"after them (the damaged file is saved as {aside})")


def _constraints(frozen_trial) -> Sequence[float]:
    return frozen_trial.user_attrs.get("constraint", (1.0,))


class Search:
    """One bucket's search; `run(measure)` with `measure(configs) -> list[Trial]`."""

    def __init__(self, candidates: list[dict], params: dict, *, seeds: Sequence[dict] = (), max_trials: int = 200,
                 patience: int = 40, min_gain: float = 0.01, sweep_limit: int = 200, seed: int = 0,
                 parallel: int = 1, study=None, deadline: float | None = None,
                 clock: Callable[[], float] = time.monotonic, on_trial: Callable[[Trial, int], None] | None = None):
        if not candidates:
            raise ValueError("candidates: expected at least one config")
        self.candidates = {config_key(c): c for c in candidates}
        self.params = params
        self.seeds = [s for s in dict.fromkeys(map(config_key, seeds)) if s in self.candidates]
        self.max_trials, self.patience, self.min_gain = max_trials, patience, min_gain
        self.rng = random.Random(seed)
        self.parallel = max(1, parallel)
        self.study = study
        self.deadline, self.clock, self.on_trial = deadline, clock, on_trial
        small = len(self.candidates) <= sweep_limit
        self.strategy = "sweep" if small else "tpe" if _optuna() is not None else "random"
        self.trials: list[Trial] = []
        self.measured: dict = {}  # config key -> Trial
        self.best = float("inf")
        self.since_gain = 0
        self.batches = 0  # batches measured by this run (the first is measured whatever the deadline)

    # --- bookkeeping --------------------------------------------------------------------------------
    def _record(self, trial: Trial) -> None:
        self.trials.append(trial)
        self.measured[config_key(trial.config)] = trial
        if trial.value is not None and trial.value < self.best * (1 - self.min_gain):
            self.since_gain = 0
        else:
            self.since_gain += 1
        if trial.value is not None:
            self.best = min(self.best, trial.value)
        if self.on_trial:
            self.on_trial(trial, len(self.trials))

    def _room(self) -> int:
        """Configs the next batch may hold: `parallel`, at most the trials left; the seeds alone first."""
        room = min(self.parallel, self.max_trials - len(self.trials))
        seeds_left = sum(key not in self.measured for key in self.seeds)
        return min(room, seeds_left) if seeds_left and not self.batches else room

    def _stop(self) -> str | None:
        if len(self.measured) >= len(self.candidates):
            return "exhausted"
        if len(self.trials) >= self.max_trials:
            return "trials"
        if self.since_gain >= self.patience:
            return "patience"
        if self.deadline is not None and self.batches and self.clock() >= self.deadline:
            return "time"
        return None

    def _resume(self) -> int:
        """Load the measured trials of an existing study (a rerun with --resume)."""
        done = [t for t in self.study.trials if t.state.name == "COMPLETE" and "status" in t.user_attrs]
        for t in done:
            ok = t.user_attrs["status"] == "ok"
            trial = Trial(dict(t.params), t.value if ok else None, t.user_attrs["status"],
                          t.user_attrs.get("detail", {}))
            if config_key(trial.config) in self.candidates and config_key(trial.config) not in self.measured:
                self._record(trial)
        for t in self.study.trials:  # asked but never told (the run was killed): close them
            if t.state.name == "RUNNING":
                self.study.tell(t.number, state=_optuna().trial.TrialState.FAIL)
        return len(self.trials)

    def _tell(self, handle, trial: Trial) -> None:
        """Record `trial` in the study (a failed or infeasible one as a constraint violation)."""
        if handle is None:
            return
        violation = 0.0 if trial.value is not None else 1.0
        if hasattr(handle, "set_constraint"):
            handle.set_constraint("failed", violation)
        else:
            handle.set_user_attr("constraint", (violation,))
        handle.set_user_attr("status", trial.status)
        handle.set_user_attr("detail", trial.detail)
        self.study.tell(handle, trial.value if trial.value is not None else PENALTY)

    # --- proposals ----------------------------------------------------------------------------------
    def _distributions(self) -> dict:
        optuna = _optuna()
        return {name: optuna.distributions.CategoricalDistribution(values) for name, values in self.params.items()}

    def _next_sweep(self, order: list) -> list[tuple]:
        """Up to `parallel` unmeasured candidates of `order`, each with its study trial (or None)."""
        batch = []
        while order and len(batch) < self._room():
            key = order.pop(0)
            if key in self.measured:
                continue
            handle = None
            if self.study is not None:
                self.study.enqueue_trial(dict(key))
                handle = self.study.ask(self._distributions())
            batch.append((self.candidates[key], handle))
        return batch

    def _next_tpe(self) -> list[tuple]:
        """Up to `parallel` new candidates proposed by TPE. Proposals that are not candidates are told as
        infeasible at once; a config measured before is told its result again (and a random unmeasured
        candidate is enqueued, so the search keeps moving), one already in this batch is told as failed;
        after 20 * parallel proposals the batch is filled with random unmeasured candidates."""
        batch, asked = [], 0
        distributions = self._distributions()
        optuna = _optuna()
        while len(batch) < self._room():
            taken = {config_key(c) for c, _ in batch}
            fresh = [k for k in self.candidates if k not in self.measured and k not in taken]
            if not fresh:
                break
            if asked >= 20 * self.parallel:
                self.study.enqueue_trial(dict(self.rng.choice(fresh)))
            asked += 1
            handle = self.study.ask(distributions)
            key = config_key(handle.params)
            if key not in self.candidates:
                self._tell(handle, Trial(handle.params, None, "infeasible"))
            elif key in self.measured:
                self._tell(handle, self.measured[key])
                self.study.enqueue_trial(dict(self.rng.choice(fresh)))
            elif key in taken:
                self.study.tell(handle, state=optuna.trial.TrialState.FAIL)
            else:
                batch.append((self.candidates[key], handle))
        return batch

    # --- the loop -----------------------------------------------------------------------------------
    def run(self, measure: Callable[[list], list]) -> Outcome:
        resumed = self._resume() if self.study is not None and self.study.trials else 0
        if self.strategy == "tpe":
            if self.study is None:
                raise ValueError("study: TPE needs an Optuna study (see open_study)")
            for key in self.seeds:
                if key not in self.measured:
                    self.study.enqueue_trial(dict(key))
        seeds = set(self.seeds)
        rest = [k for k in self.candidates if k not in seeds]
        self.rng.shuffle(rest)
        order = self.seeds + rest
        stop = self._stop()
        while stop is None:
            batch = self._next_tpe() if self.strategy == "tpe" else self._next_sweep(order)
            if not batch:
                stop = "exhausted"
                break
            for (config, handle), trial in zip(batch, measure([c for c, _ in batch])):
                if trial.status == CUT:
                    if handle is not None:
                        self.study.tell(handle, state=_optuna().trial.TrialState.FAIL)
                    continue
                self._record(trial)
                self._tell(handle, trial)
            self.batches += 1
            stop = self._stop()
        return Outcome(self.trials, self.strategy, stop, resumed)
