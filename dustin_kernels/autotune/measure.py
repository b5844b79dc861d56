"""Measurement protocol of the tuner.

1. Prepare (before any timing, `jobs` configs at a time in worker processes): compile each config
   ahead of time for the target arch with `dustin_kernels.aot.check` (dropped: compile errors and
   shared memory above the device's limit; verdicts cached on disk per spec, config, template and
   Triton version), then run it once on a small ragged problem against the float64 reference of
   `dustin_kernels.ref` (dropped: launch errors and wrong results). The real run also fills Triton's
   on-disk compile cache, so the timing process does not compile. On a GPU the workers are a sandbox:
   a config whose preparation outlives `timeout` is dropped as "timeout" (the workers' Python stacks
   are printed: where they were stuck) and the workers replaced; one that kills its worker is dropped
   alone; so a hanging compile or kernel never stalls the run, and the timing process only runs
   configs that already ran correctly once.
2. Time (GPU): the public op under `dispatch.override`, captured in a CUDA graph where capture works
   (no Python or launch overhead in the figure), `triton.testing.do_bench` with the L2 cache flushed
   before every replay; median and IQR of all replays. NVML is read around each block: clock-event
   (throttle) reasons and the thermal violation counter; a throttled block is repeated, and one that
   stays throttled is reported as such.
3. Final (`Timer.interleaved`): the best few, the default rule and the baseline are re-measured in
   rounds that interleave them, so that drift hits all alike.
In the interpreter (`--interpret`) times are wall-clock medians of a few calls: not performance figures.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import faulthandler
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from .. import aot, codegen, dispatch
from ..family import family
from ..measurement import cuda_graph, git_commit, versions
from .search import CUT
from .workloads import Problem, Workload, build

SMEM_LIMIT = {"sm80": 166912, "sm90": 232448}  # bytes per block (A100, H100/H200) without a device to ask
PREPARE_TIMEOUT = 300.0  # seconds one batch of preparations may take (the slowest compile measured: ~80 s)
DUMP_SIGNAL = signal.SIGUSR1  # a preparation worker prints its Python stacks on it (faulthandler)
STICKY_ERRORS = ("CUDA error", "[CUDA]", "illegal memory access", "unspecified launch failure")


@dataclasses.dataclass
class Timing:
    median_us: float
    iqr_us: float
    samples: int
    throttle: list  # throttle reasons seen in the block that produced the figure ([] = clean)


# --- NVML ------------------------------------------------------------------------------------------

class Monitor:
    """NVML readings of one CUDA device; every method is a no-op when NVML is unavailable."""

    def __init__(self, device: torch.device | None):
        self.nvml = self.handle = None
        if device is None or device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            bus = getattr(props, "pci_bus_id", None)
            if bus is not None:
                pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
                self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci)
            else:
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception:  # no NVML library, no permission, no matching device: no readings
            self.nvml = self.handle = None

    def _call(self, name: str, *args):
        try:
            return getattr(self.nvml, name)(self.handle, *args)
        except Exception:
            return None

    def info(self) -> dict:
        """Driver, max clocks and power limit (for the DB's _meta)."""
        if self.nvml is None:
            return {"driver": None, "clocks": {"sm_max_mhz": None, "mem_max_mhz": None, "power_limit_w": None}}
        try:
            driver = self.nvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:
            driver = None
        power = self._call("nvmlDeviceGetPowerManagementLimit")
        return {"driver": driver, "clocks": {
            "sm_max_mhz": self._call("nvmlDeviceGetMaxClockInfo", self.nvml.NVML_CLOCK_SM),
            "mem_max_mhz": self._call("nvmlDeviceGetMaxClockInfo", self.nvml.NVML_CLOCK_MEM),
            "power_limit_w": power / 1000 if power is not None else None}}

    def snapshot(self) -> dict:
        if self.nvml is None:
            return {}
        reasons = (self._call("nvmlDeviceGetCurrentClocksEventReasons")
                   if hasattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons")
                   else self._call("nvmlDeviceGetCurrentClocksThrottleReasons"))
        thermal = self._call("nvmlDeviceGetViolationStatus", self.nvml.NVML_PERF_POLICY_THERMAL)
        power = self._call("nvmlDeviceGetViolationStatus", self.nvml.NVML_PERF_POLICY_POWER)
        return {"reasons": reasons or 0,
                "thermal_ns": getattr(thermal, "violationTime", 0), "power_ns": getattr(power, "violationTime", 0),
                "sm_mhz": self._call("nvmlDeviceGetClockInfo", self.nvml.NVML_CLOCK_SM),
                "temp_c": self._call("nvmlDeviceGetTemperature", self.nvml.NVML_TEMPERATURE_GPU)}

    def throttled(self, before: dict, after: dict) -> list[str]:
        """Throttle reasons between two snapshots (thermal or hardware slowdowns; a software power cap
        is the normal state of a loaded GPU and is not counted)."""
        if not after:
            return []
        n = self.nvml
        bits = {"hw_slowdown": n.nvmlClocksThrottleReasonHwSlowdown,
                "sw_thermal": n.nvmlClocksThrottleReasonSwThermalSlowdown,
                "hw_thermal": n.nvmlClocksThrottleReasonHwThermalSlowdown,
                "hw_power_brake": n.nvmlClocksThrottleReasonHwPowerBrakeSlowdown}
        found = [name for name, bit in bits.items() if after["reasons"] & bit]
        if after["thermal_ns"] > before.get("thermal_ns", after["thermal_ns"]):
            found.append("thermal_violation")
        return found


# --- timing ----------------------------------------------------------------------------------------

def _stats(times_ms: list) -> tuple[float, float]:
    """(median, interquartile range) in microseconds."""
    if len(times_ms) < 2:
        return times_ms[0] * 1e3, 0.0
    q1, q2, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return q2 * 1e3, (q3 - q1) * 1e3


class Timer:
    """Times callables on `device`: CUDA (graph replay, do_bench, L2 flush, NVML) or CPU (interpreter)."""

    def __init__(self, device: torch.device, *, rep_ms: float = 40, warmup_ms: float = 10, retries: int = 2,
                 cpu_reps: int = 3, graphs: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.monitor = Monitor(device)
        self.rep_ms, self.warmup_ms, self.retries, self.cpu_reps = rep_ms, warmup_ms, retries, cpu_reps
        self.graphs = graphs and self.cuda

    def prepare(self, fn):
        """`fn` as a CUDA-graph replay where capture works, else `fn` itself."""
        graph = cuda_graph(fn, self.device) if self.graphs else None
        return graph.replay if graph is not None else fn

    def _block(self, fn, rep_ms: float) -> list:
        """Raw times (ms) of one block of calls."""
        if not self.cuda:
            fn()  # warm-up
            times = []
            for _ in range(self.cpu_reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return times
        import triton.testing

        return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=rep_ms, return_mode="all")

    def time(self, fn, rep_ms: float | None = None) -> Timing:
        """Median and IQR of `fn` (already prepared); a throttled block is repeated up to `retries` times."""
        for attempt in range(self.retries + 1):
            before = self.monitor.snapshot()
            times = self._block(fn, rep_ms or self.rep_ms)
            throttle = self.monitor.throttled(before, self.monitor.snapshot())
            if not throttle:
                break
            time.sleep(1.0 + attempt)  # let the GPU cool down before repeating the block
        median, iqr = _stats(times)
        return Timing(median, iqr, len(times), throttle)

    def interleaved(self, fns: dict, rounds: int = 5) -> dict:
        """{name: Timing} of every callable, re-measured in `rounds` interleaved rounds (order rotated
        each round); a throttled round is repeated up to `retries` times. The timings carry the reasons of
        every round that stayed throttled (any such round taints the figures)."""
        names = list(fns)
        times = {name: [] for name in names}
        throttle: list = []
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for attempt in range(self.retries + 1):
                before = self.monitor.snapshot()
                block = {name: self._block(fns[name], self.rep_ms / 2) for name in order}
                reasons = self.monitor.throttled(before, self.monitor.snapshot())
                if not reasons:
                    break
                time.sleep(1.0 + attempt)
            throttle += [reason for reason in reasons if reason not in throttle]
            for name in names:
                times[name] += block[name]
        return {name: Timing(*_stats(times[name]), len(times[name]), throttle) for name in names}


def runner(problem: Problem, spec, config: dict):
    """A callable that runs the problem's op with `config` pinned for `spec`."""
    def run():
        with dispatch.override(config, spec=spec):
            return problem.call()
    return run


# --- preparation: AOT verdicts and the correctness run ----------------------------------------------

def _aot_key(spec, config: dict, smem_limit: int) -> str:
    import triton

    config_text = json.dumps(config, sort_keys=True)
    return f"{spec.uri()}|{config_text}|{codegen.template_hash(spec.kernel)}|{triton.__version__}|{smem_limit}"


def aot_verdict(spec, config: dict, smem_limit: int) -> dict:
    """Compile `config` for `spec.arch` without running it: {"ok", "error", registers, spills, shared}."""
    results = aot.check(spec, config, family(spec.kernel).aot_kernels)
    verdict = {"registers": max(r.registers for r in results), "spill_bytes": max(r.spill_bytes for r in results),
               "shared_bytes": max(r.shared_bytes for r in results),
               "error": "; ".join(f"{r.function}: {r.error}" for r in results if r.error)}
    if not verdict["error"] and verdict["shared_bytes"] > smem_limit:
        verdict["error"] = f"shared memory {verdict['shared_bytes']} B exceeds the limit {smem_limit} B"
    verdict["ok"] = not verdict["error"]
    return verdict


class _Worker:
    """State of a preparation process: small problems and their references, per workload."""
    problems: dict = {}

    @classmethod
    def init(cls, interpret: bool):
        if not interpret:
            os.environ.pop("TRITON_INTERPRET", None)
        faulthandler.register(DUMP_SIGNAL, all_threads=True)  # the tuner asks where a hung worker is stuck
        torch.set_num_threads(1)  # `jobs` workers share the CPUs (float64 references, compiles)
        cls.problems = {}

    @classmethod
    def problem(cls, workload: dict, device: str):
        key = (json.dumps(workload, sort_keys=True), device)
        if key not in cls.problems:
            small = build(Workload.from_json(workload).small(), device, ragged=True, seed=1)
            cls.problems[key] = (small, small.reference())
        return cls.problems[key]


def prepare_one(task: dict) -> dict:
    """One config: {"status": "ok" | "compile" | "launch" | "wrong", "detail": {...}} (runs in a worker);
    the detail holds the AOT verdict, any error, and the seconds spent compiling and checking."""
    from ..spec import KernelSpec

    start = time.monotonic()
    detail: dict = {}
    status = _prepare(KernelSpec.from_uri(task["uri"]), task, detail)
    detail["prepare_s"] = round(time.monotonic() - start, 2)
    return {"status": status, "detail": detail}


def _prepare(spec, task: dict, detail: dict) -> str:
    if task["aot"]:
        start = time.monotonic()
        try:
            verdict = aot_verdict(spec, task["config"], task["smem_limit"])
        except Exception as exc:  # aot_kernels itself rejected the config
            verdict = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        detail["aot"], detail["aot_s"] = verdict, round(time.monotonic() - start, 2)
        if not verdict["ok"]:
            return "compile"
    if not task["run"]:
        return "ok"
    try:
        problem, expected = _Worker.problem(task["workload"], task["device"])
        out = runner(problem, spec, task["config"])()
        if problem.inputs["seq_lens"].is_cuda:
            torch.cuda.synchronize()
        wrong = problem.mismatch(out, expected)
    except Exception as exc:
        detail["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-800:]
        # a CUDA error is sticky: the process that hit it cannot launch again
        detail["fatal"] = any(text in detail["error"] for text in STICKY_ERRORS)
        return "launch"
    if wrong:
        detail["error"] = wrong
        return "wrong"
    return "ok"


class Preparer:
    """Runs `prepare_one` for batches of configs with a verdict cache. On a GPU or when jobs > 1 it runs
    them in worker processes, a sandbox with a time limit; else in this process (the interpreter's
    tests, no time limit). Statuses beyond `prepare_one`'s: "timeout" (still running after `timeout`
    seconds: the workers' stacks are printed and the workers replaced), "cut" (still running at the
    deadline: not measured, see `search.CUT`), "launch" with `crashed` (its worker died)."""

    def __init__(self, device: torch.device, arch: str, *, jobs: int = 1, use_aot: bool = True,
                 cache: Path | None = None, timeout: float = PREPARE_TIMEOUT, prepare_fn=None):
        self.device, self.arch = device, arch
        self.use_aot = use_aot and arch in SMEM_LIMIT
        self.smem_limit = SMEM_LIMIT.get(arch, 0)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            self.smem_limit = getattr(props, "shared_memory_per_block_optin", self.smem_limit)
        self.cache_path = cache or codegen.cache_dir().parent / "aot_verdicts.json"
        try:
            self.verdicts = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            self.verdicts = {}
        if not timeout > 0:
            raise ValueError(f"timeout: expected seconds > 0, got {timeout!r}")
        self.jobs, self.timeout = max(1, jobs), timeout
        self.prepare_fn = prepare_fn or prepare_one  # a module-level function (workers import it)
        self.sandboxed = jobs > 1 or device.type == "cuda"
        self.pool = None  # started on first use, replaced after a hang or a crash

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()  # the workers are idle: every batch ended with its futures done or killed

    def _submit(self, tasks: list) -> list:
        for _ in range(2):
            if self.pool is None:
                self.pool = concurrent.futures.ProcessPoolExecutor(
                    self.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_Worker.init,
                    initargs=(self.arch == "interp",))
            try:
                return [self.pool.submit(self.prepare_fn, t) for t in tasks]
            except concurrent.futures.BrokenExecutor:  # a worker died while idle
                self._stop_workers(dump=False)
        raise RuntimeError("preparation workers: the pool broke twice while starting")

    def _stop_workers(self, dump: bool) -> None:
        """End the pool and kill its workers (this process's only multiprocessing children); `dump`:
        first have each print its Python stacks, one after the other (where it hung)."""
        workers = multiprocessing.active_children()
        for worker in workers if dump else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, DUMP_SIGNAL)
                time.sleep(0.5)  # one dump at a time on the shared stderr
        for worker in workers:
            worker.kill()
            worker.join(timeout=5.0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = None

    def _run_pool(self, tasks: list, deadline: float | None) -> list:
        limit = self.timeout if deadline is None else max(0.0, min(self.timeout, deadline - time.monotonic()))
        start = time.monotonic()
        try:
            futures = self._submit(tasks)
            late = concurrent.futures.wait(futures, timeout=limit).not_done
        except BaseException:  # interrupted (Ctrl-C): a worker may be stuck where no signal reaches it
            if self.pool is not None:
                self._stop_workers(dump=False)
            raise
        hung = bool(late) and limit >= self.timeout  # else the deadline cut them: not a verdict on the configs
        results, crashed = [], []
        for i, future in enumerate(futures):
            if future in late:
                why = f"the {self.timeout:.0f} s limit" if hung else "the bucket's time budget"
                results.append({"status": "timeout" if hung else CUT, "detail": {
                    "error": f"preparation unfinished after {time.monotonic() - start:.0f} s ({why})"}})
                continue
            try:
                results.append(future.result())
            except concurrent.futures.BrokenExecutor:  # some worker died: which one, below
                results.append(None)
                crashed.append(i)
        if hung:
            stuck = [t["config"] for t, f in zip(tasks, futures) if f in late and f.running()]
            print(f"preparation: {len(late)} of {len(tasks)} configs unfinished after {limit:.0f} s; the workers' "
                  f"stacks follow (running: {stuck})", file=sys.stderr, flush=True)
        if late or crashed or any(r and r["detail"].get("fatal") for r in results):
            self._stop_workers(dump=hung)
        for i in crashed:  # alone in fresh workers, so that only the config that kills its worker fails
            results[i] = ({"status": "launch", "detail": {"error": "its worker died (a crash in a compiler or the "
                                                                   "driver)", "crashed": True}}
                          if len(tasks) == 1 else self._run_pool([tasks[i]], deadline)[0])
        return results

    def __call__(self, workload: Workload, spec, configs: list, deadline: float | None = None) -> list[dict]:
        """{"status", "detail"} per config (see `prepare_one` and the class); `deadline` (time.monotonic)
        cuts the batch short. AOT verdicts come from the cache when known."""
        tasks = []
        for config in configs:
            cached = self.verdicts.get(_aot_key(spec, config, self.smem_limit)) if self.use_aot else None
            tasks.append({"uri": spec.uri(), "config": config, "workload": workload.to_json(),
                          "device": str(self.device), "smem_limit": self.smem_limit,
                          "aot": self.use_aot and cached is None, "run": cached is None or cached["ok"]})
        if self.sandboxed:
            results = self._run_pool(tasks, deadline)
        else:
            results = [self.prepare_fn(t) for t in tasks]
        for task, result in zip(tasks, results):
            if not self.use_aot:
                continue
            key = _aot_key(spec, task["config"], self.smem_limit)
            if not task["aot"]:  # a known verdict
                result["detail"]["aot"] = self.verdicts[key]
                if not self.verdicts[key]["ok"]:
                    result["status"] = "compile"
            elif "aot" in result["detail"]:  # a new one (none when the preparation hung, was cut or crashed)
                self.verdicts[key] = result["detail"]["aot"]
        if any(t["aot"] for t in tasks):
            self._save()
        return results

    def _save(self) -> None:
        """Write the verdict cache; where it cannot be written the run goes on (it only saves recompiles)."""
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}.tmp")
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.verdicts, sort_keys=True))
            os.replace(tmp, self.cache_path)
        except OSError as exc:
            warnings.warn(f"AOT verdict cache {self.cache_path}: not written ({type(exc).__name__}: "
                          f"{exc.strerror or exc}); verdicts are kept for this run only", RuntimeWarning)


def environment(device: torch.device, monitor: Monitor) -> dict:
    """Provenance fields of the DB's _meta that describe the machine and software (keys fixed by the DB's
    schema; `dustin_kernels.measurement.provenance` is the benchmarks' counterpart)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"gpu_name": props.name, "compute_capability": f"{props.major}.{props.minor}",
               "sm_count": props.multi_processor_count}
    else:
        gpu = {"gpu_name": "cpu (Triton interpreter)", "compute_capability": None, "sm_count": None}
    return {**gpu, **monitor.info(), **versions(), "cuda": torch.version.cuda if device.type == "cuda" else None,
            "git_commit": git_commit()}
