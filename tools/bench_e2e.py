"""End-to-end speculative decoding on the retrieval testbed: tokens/s, acceptance and ms per step per
policy beside the step's bytes floor (weights + KV + score bytes at the measured copy bandwidth); a
profile of the eager step that says where its time goes on the host and on the device; and the paper's
shape (Qwen2.5-72B target + 0.5B draft, batch 16, 32K, budget 512) computed from the measured H200 per-op
timings of `tools/results/h200-session2` and the byte counts of the models.

    python tools/bench_e2e.py [--out DIR] [--shape PRESET] [--layers N] [--draft-kv-heads N] [--contexts 2048 4096]
        [--batches 1 4] [--policies plain dense dustin streaming quest] [--budget 64] [--gamma 4]
        [--new-tokens 16] [--device cuda] [--dtype bf16] [--compile [BACKEND]]

Each (context, batch, policy) runs a warm-up of 3 * (gamma + 1) new tokens (at least 3 steps: with
--compile the step's graph is built there, and CUDA graphs run eagerly, then record, then replay), a timed
run (`ms_per_step`, `tokens_per_s`: the compiled step with --compile, Inductor unless BACKEND names another
torch.compile backend, CUDA graphs on CUDA; else the eager step), a torch.profiler run of the eager step
and, with --compile, an unprofiled eager run (`ms_per_step_eager`; without --compile it is the timed run).
Timed runs count their steps after the first (`Stats.steady`: a run's new caches make its first compiled
step record a CUDA graph again). A (context, batch, policy) that fails gets a row with its `error` only,
the others still run, and the exit code is 1.

The profile covers whole iterations of the decode loop (from the second step's draft range to the last
step's) and gives per step, for the step and by phase (the draft's passes, selection = select + refine,
the target's attention, the rest of the target, the rest of the step: the torch.profiler ranges of
`policies.PHASES`), the fields `<quantity>_<phase>` and `<quantity>_per_step`:
- `ms`: host wall time (`ms_per_step_profiled` for the step; profiling slows the host, so the phases add
  up to it, not to `ms_per_step_eager`);
- `device_ms`: GPU time of the kernels and copies launched inside (None on CPU);
- `launches`: CUDA kernel launch calls, runtime and driver (Triton) ones (None on CPU);
- `ops`: outermost aten / dustin_kernels ops, the dispatches (in eager mode the Triton kernels are launched
  from Python, not as ops: on CUDA they count in launches only; on CPU their torch reference runs as ops);
- `syncs`: host waits for the device: item() (`aten::_local_scalar_dense`), `aten::nonzero`, and on CUDA
  the synchronize calls, blocking copies (.tolist(), torch.tensor(..., device=)) included, each counted
  once. On CPU only the first two show: there a .tolist() is no op.
`host_bound` = 1 - device_ms_per_step / ms_per_step_eager: the share of the eager step the device idles
(None on CPU); `device_unmatched`: the share of the profile's device time whose launch call it lacks (so
not in the phases; 0 expected). `compile_s`: the warm-up's wall time with --compile (graph building
included); `graphs_built`: graphs Dynamo built in the warm-up; `graphs_built_timed`: in the timed run (0
expected, a warning says otherwise); `cudagraph_skips`: Inductor's CUDA-graph skips in the warm-up.

Writes into --out (default: $DUSTIN_CACHE_DIR/bench_e2e): bench_e2e.json and bench_e2e.csv (a row per
context x batch x policy), top_ops.csv (per policy at the largest context and batch: the 20 names, ops,
ranges, CUDA API calls, and the host time outside all of them, with the most self host time per step of
the eager step, their calls and the device time of their launches per step), tokens_per_s.png (tokens/s
against context per policy, a panel per batch) and breakdown.png (host ms per step by phase per policy at
the largest context and batch, with the bytes floor and, on CUDA, the device ms). On a CPU the timings
show the mechanics, not the method's speed.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dustin_kernels import codegen, testbed  # noqa: E402
from dustin_kernels.measurement import copy_gbs, provenance  # noqa: E402
from dustin_kernels.devices import default_device, device_arg  # noqa: E402
from dustin_kernels.models import DTYPES  # noqa: E402
from dustin_kernels.policies import PHASES, POLICIES, make_policy  # noqa: E402
from dustin_kernels.shapes import PRESETS  # noqa: E402
from dustin_kernels.speculative import generate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
H200 = ROOT / "tools" / "results" / "h200-session2" / "bench_kernels_qwen2.json"
BREAKDOWN = ("draft", "selection", "target attention", "rest of target", "rest of step")


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_floor_bytes(stats, draft, target, batch: int, context: int, gamma: int) -> float:
    """Bytes one step must read: the target's weights and the KV / score bytes it read (per step), the
    draft's weights and its KV cache in each of its gamma + 1 passes (sequences at about `context`)."""
    total = param_bytes(target) + (stats.kv_read_bytes + stats.score_bytes) / max(stats.steps, 1)
    if gamma:
        per_token = 2 * sum(layer.self_attn.k_proj.out_features for layer in draft.layers) * draft.dtype.itemsize
        total += (gamma + 1) * (param_bytes(draft) + batch * context * per_token)
    return total


QUANTITIES = ("ms", "device_ms", "launches", "ops", "syncs")  # per step; "ms": host ms
OPS = ("aten::", "dustin_kernels::")
CUDA_API = re.compile(r"_*cu(da)?[A-Z]")  # a CUDA runtime or driver call: cudaLaunchKernel, cuLaunchKernelEx
LAUNCHES = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                      "cuLaunchKernelEx"})
# item() / int() / bool() of a tensor; nonzero (a sync on CUDA: CPU stand-in); on CUDA the synchronize calls,
# blocking copies (copy_ / .tolist() / torch.tensor(..., device=) end in cudaStreamSynchronize) included
SYNCS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                   "cudaEventSynchronize", "cudaMemcpy", "cuStreamSynchronize", "cuCtxSynchronize"})
OUTSIDE = "(outside any op or range)"
TOP_OPS = 20


def api_name(name: str) -> str:
    """A CUDA API event's name without its version / per-thread-stream suffix (cudaLaunchKernel_v7000_ptsz)."""
    return re.sub(r"(_v\d+)?(_pt(sz|ds))?$", "", name)


def is_op(name: str) -> bool:
    return name.startswith(OPS)


def is_launch(name: str) -> bool:
    return api_name(name) in LAUNCHES


def is_sync(name: str) -> bool:
    return api_name(name) in SYNCS


def outermost(event, kind) -> bool:
    """`event` is of `kind` (a test on names) and none of its callers is (an op inside an op, the
    cudaStreamSynchronize inside item(), a driver launch inside a runtime launch count once)."""
    if not kind(event.name):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if kind(parent.name):
            return False
        parent = parent.cpu_parent
    return True


class StepProfile(NamedTuple):
    """per_step: {"step" or a `policies.PHASES` name: {quantity: per step}}; top_ops: rows of `TOP_OPS`;
    device_unmatched: the share of the profile's device time whose launch call it lacks (None on CPU)."""
    per_step: dict[str, dict[str, float | None]]
    top_ops: list[dict]
    device_unmatched: float | None


def profile_step(run, device: torch.device) -> StepProfile:
    """`summarize` a torch.profiler run of one eager generation `run()` of at least 3 steps."""
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        steps = run().stats.steps
    return summarize(prof.events(), steps, cuda)


def device_us_by_launch(events) -> tuple[collections.Counter, float]:
    """Device us of the kernels and copies in torch.profiler `events` per CUPTI correlation id (that of the
    CUDA API call that launched them; the ranges' GPU spans left out), and the share of that time whose
    launch call is not among the events."""
    ranges = {e.name for e in events if e.device_type == DeviceType.CPU and e.is_user_annotation}
    device_us = collections.Counter()
    for e in events:
        if e.device_type != DeviceType.CPU and not e.is_user_annotation and e.name not in ranges:
            device_us[e.id] += e.time_range.elapsed_us()
    launched = {e.id for e in events if e.device_type == DeviceType.CPU and CUDA_API.match(e.name)}
    unmatched = sum(us for corr, us in device_us.items() if corr not in launched)
    return device_us, unmatched / max(sum(device_us.values()), 1)


def summarize(events, steps: int, cuda: bool) -> StepProfile:
    """The profile of a generation's `steps` steps from its torch.profiler `events` (FunctionEvents). The
    window runs from the second step's draft range to the last step's: whole loop iterations, without the
    prefill, the first call or the tail. A phase counts every event that starts inside one of its ranges,
    nested ones included; a kernel (or copy) counts where its launch call starts, so the Triton kernels
    launched from Python, outside any op, count too."""
    device_us, unmatched = device_us_by_launch(events)
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    marks = sorted((e for e in host if e.name == PHASES["draft"]), key=lambda e: e.time_range.start)
    if len(marks) != steps or steps < 3:
        raise RuntimeError(f"profile: expected one {PHASES['draft']!r} range per step and at least 3 steps, got "
                           f"{len(marks)} ranges in {steps} steps")
    begin, end, n = marks[1].time_range.start, marks[-1].time_range.start, steps - 2
    window = sorted((e for e in host if begin <= e.time_range.start < end),
                    key=lambda e: (e.time_range.start, -e.time_range.end))
    scope_of = {label: name for name, label in PHASES.items()}
    totals = {scope: dict.fromkeys(QUANTITIES, 0.0) for scope in ("step", *PHASES)}
    totals["step"]["ms"] = (end - begin) / 1e3
    by_name = collections.defaultdict(lambda: [0, 0.0, 0.0])  # name: calls, self host us, device us of its launches
    inside = []  # the phase ranges holding the current event, outermost first
    for e in window:
        while inside and inside[-1].time_range.end <= e.time_range.start:
            inside.pop()
        if e.name in scope_of:
            inside.append(e)
            totals[scope_of[e.name]]["ms"] += e.cpu_time_total / 1e3
        gpu_us = device_us[e.id] if CUDA_API.match(e.name) else 0.0
        counts = {"device_ms": gpu_us / 1e3, "launches": outermost(e, is_launch), "ops": outermost(e, is_op),
                  "syncs": outermost(e, is_sync)}
        for scope in {"step"} | {scope_of[r.name] for r in inside}:
            for quantity, value in counts.items():
                totals[scope][quantity] += value
        by_name[e.name][0] += 1
        by_name[e.name][1] += e.self_cpu_time_total
        if gpu_us:
            owner = e.cpu_parent or (inside[-1] if inside else None)  # a launch from Python has no op: its range
            by_name[owner.name if owner else OUTSIDE][2] += gpu_us
    by_name[OUTSIDE][1] += 1e3 * totals["step"]["ms"] - sum(
        e.cpu_time_total for e in window if e.cpu_parent is None and e.thread == marks[0].thread)
    per_step = {scope: {q: None if q in ("device_ms", "launches") and not cuda else v / n for q, v in t.items()}
                for scope, t in totals.items()}
    return StepProfile(per_step, top_ops(by_name, n, cuda), unmatched if cuda else None)


def top_ops(by_name: dict[str, list], n: int, cuda: bool) -> list[dict]:
    """The TOP_OPS names of `by_name` {name: [calls, self host us, device us]} over `n` steps with the most self
    host time, as rows per step."""
    rows = [{"op": name, "calls_per_step": rounded(calls / n) if name != OUTSIDE else None,
             "self_host_ms_per_step": rounded(us / 1e3 / n),
             "device_ms_per_step": rounded(device / 1e3 / n) if cuda else None}
            for name, (calls, us, device) in by_name.items()]
    return sorted(rows, key=lambda r: -r["self_host_ms_per_step"])[:TOP_OPS]


def profile_fields(per_step: dict[str, dict[str, float | None]]) -> dict:
    """Row fields of a `StepProfile.per_step`: each quantity by BREAKDOWN phase (rest of target = target -
    attention - refine, rest of step = step - draft - select - target) and for the whole step."""
    fields = {}
    for q in QUANTITIES:
        v = {scope: per_step[scope][q] for scope in per_step}
        step = v["step"]
        parts = None if step is None else (
            v["draft"], v["select"] + v["refine"], v["attention"], v["target"] - v["attention"] - v["refine"],
            step - v["draft"] - v["select"] - v["target"])
        for phase, value in zip(BREAKDOWN, parts or [None] * len(BREAKDOWN)):
            fields[f"{q}_{phase.replace(' ', '_')}"] = rounded(value)
        fields["ms_per_step_profiled" if q == "ms" else f"{q}_per_step"] = rounded(step)
    return fields


def rounded(value: float | None) -> float | None:
    """Profile figures to 3 decimals (ms to the microsecond), None as is."""
    return None if value is None else round(value, 3)


def warm_tokens(gamma: int) -> int:
    """New tokens of the warm-up: at least 3 steps (CUDA graphs run eagerly, then record, then replay)."""
    return 3 * (gamma + 1)


def compile_counts() -> tuple[int, int]:
    """Graphs Dynamo built and CUDA graphs Inductor skipped so far in this process."""
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def measure(spec, draft, target, policy_name: str, context: int, batch: int, args, bandwidth: float):
    """A row of the results and the top ops of its eager step."""
    prompts = [testbed.prompt(spec, context, seed=args.seed + b) for b in range(batch)]
    ids, values = [p for p, _ in prompts], [v for _, v in prompts]
    plain = policy_name == "plain"
    policy = make_policy("dense" if plain else policy_name, testbed.profile(spec), budget=args.budget)
    gamma = 0 if plain else args.gamma
    warm = warm_tokens(gamma)
    profiled = max(args.new_tokens, warm)  # >= 3 steps: the profile window skips the first and the last
    max_len = context + profiled + gamma  # one cache size for every run (CUDA graphs are recorded per size)

    def run(new_tokens, compile=args.compile or False):
        return generate(None if plain else draft, target, ids, max_new_tokens=new_tokens, gamma=gamma,
                        policy=policy, eos_ids=(), compile=compile, max_len=max_len)

    graphs, skips = compile_counts()
    begin = time.perf_counter()
    run(warm)  # kernels (and with --compile, the step's graph) compiled, caches allocated
    compile_s = time.perf_counter() - begin
    graphs_warm, skips_warm = compile_counts()
    result = run(args.new_tokens)
    graphs_timed = compile_counts()[0] - graphs_warm
    if graphs_timed:
        print(f"warning: context {context} batch {batch} {policy_name}: the timed run built {graphs_timed} graph(s) "
              "after the warm-up", file=sys.stderr)
    stats = result.stats
    step_ms, tokens_per_s = stats.steady()
    profile = profile_step(lambda: run(profiled, compile=False), args.device)
    if profile.device_unmatched and profile.device_unmatched > 0.01:
        print(f"warning: context {context} batch {batch} {policy_name}: {profile.device_unmatched:.0%} of the device "
              "time has no launch call in the profile (not in the phases)", file=sys.stderr)
    eager = run(args.new_tokens, compile=False).stats if args.compile else stats  # after the profile: warm
    eager_ms = eager.steady()[0]
    fields = profile_fields(profile.per_step)
    floor_ms = step_floor_bytes(stats, draft, target, batch, context, gamma) / (bandwidth * 1e6)
    row = {"policy": policy_name, "context": context, "batch": batch, "tokens_per_s": tokens_per_s,
           "mean_accept": stats.mean_accept, "steps": stats.steps, "ms_per_step": step_ms,
           "floor_ms_per_step": floor_ms, "floor_fraction": floor_ms / step_ms,
           "recall": sum(map(testbed.recall, result.tokens, values)) / batch, "kv_fraction": stats.kv_fraction,
           "ms_per_step_eager": eager_ms, **fields,
           "host_bound": None if fields["device_ms_per_step"] is None else 1 - fields["device_ms_per_step"] / eager_ms,
           "compile_s": compile_s if args.compile else None, "graphs_built": graphs_warm - graphs,
           "graphs_built_timed": graphs_timed, "cudagraph_skips": skips_warm - skips,
           "device_unmatched": profile.device_unmatched}
    return row, [{"policy": policy_name, **r} for r in profile.top_ops]


def paper_shape(acceptance: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0)) -> dict:
    """Qwen2.5-72B + Qwen2.5-0.5B, bf16, batch 16, 32K, gamma 4, budget 512, from the H200 kernel
    timings in tools/results/h200-session2 (80 target layers) and the models' bytes at the measured
    copy bandwidth (weights and the draft's KV are read at that rate). Steps are assumed graph-captured
    (no launch overhead)."""
    data = json.loads(H200.read_text())
    ms = {(r["kernel"], r["provider"]): r["p50_ms"] for r in data["rows"] if r["context"] == 32768}
    selection = next(r["selection_ms"] for r in data["rows"] if r["context"] == 32768 and r["selection_ms"])
    tbps = 4.2  # TB/s, the 1 GiB copy of the same run (README)
    batch, context, T = 16, 32768, 5
    target_weights_ms = 72.7e9 * 2 / tbps / 1e9
    draft_weights_ms = 0.494e9 * 2 / tbps / 1e9
    draft_kv_ms = batch * context * (24 * 2 * 2 * 64 * 2) / tbps / 1e9  # 24 layers, 2 KV heads of 64, K and V
    dense_attention_ms = 80 * ms[("dense_verify", "triton")]
    step = {"plain": target_weights_ms + dense_attention_ms,  # one token per sequence; T = 1 reads the same KV
            "dense": target_weights_ms + dense_attention_ms + T * (draft_weights_ms + draft_kv_ms),
            "dustin": target_weights_ms + 80 * ms[("sparse_verify", "triton")] + selection
            + T * (draft_weights_ms + draft_kv_ms)}
    rows = []
    for a in acceptance:
        tps = {p: batch * (1 if p == "plain" else a) / s * 1e3 for p, s in step.items()}
        rows.append({"acceptance": a, **{f"{p}_tokens_per_s": v for p, v in tps.items()},
                     "dustin_over_plain": tps["dustin"] / tps["plain"],
                     "dustin_over_dense": tps["dustin"] / tps["dense"]})
    return {"step_ms": step, "inputs": {"target_weights_ms": target_weights_ms, "draft_weights_ms": draft_weights_ms,
                                        "draft_kv_ms_per_pass": draft_kv_ms, "source": str(H200.relative_to(ROOT))},
            "rows": rows}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for p in policies:
            mine = sorted((r["context"], r["tokens_per_s"]) for r in rows if r["batch"] == batch and r["policy"] == p)
            ax.plot(*zip(*mine), marker="o", label=p)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="tokens/s", title=f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("end-to-end speculative decoding, retrieval testbed")
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=110)
    last = [r for r in rows if r["batch"] == batches[-1] and r["context"] == max(x["context"] for x in rows)]
    fig, ax = plt.subplots(figsize=(1.2 * len(last) + 3, 3.6))
    bottom = [0.0] * len(last)
    for phase in BREAKDOWN:
        values = [max(r[f"ms_{phase.replace(' ', '_')}"], 0.0) for r in last]
        ax.bar([r["policy"] for r in last], values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter([r["policy"] for r in last], [r["floor_ms_per_step"] for r in last], color="k", marker="_", s=400,
               label="bytes floor", zorder=3)
    if last[0]["device_ms_per_step"] is not None:
        ax.scatter([r["policy"] for r in last], [r["device_ms_per_step"] for r in last], color="r", marker="x",
                   label="device ms (eager)", zorder=3)
    ax.set(ylabel="host ms per step (profiled eager step)",
           title=f"step breakdown, context {last[0]['context']}, batch {last[0]['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close("all")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=codegen.cache_dir().parent / "bench_e2e")
    p.add_argument("--shape", choices=sorted(PRESETS), help="target attention shape (default: the testbed's)")
    p.add_argument("--layers", type=int, default=4, help="target layers (default 4)")
    p.add_argument("--draft-kv-heads", type=int, help="the draft's KV heads (default: the target's; fewer make its "
                   "KV cache narrower, as real drafts are: a divisor of the q heads, at most the target's KV heads)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--policies", nargs="+", default=["plain", "dense", "dustin", "streaming", "quest"],
                   choices=("plain",) + POLICIES)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", type=device_arg, default=default_device())
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                   help="time the compiled step (torch.compile fullgraph; BACKEND: Inductor unless given, with CUDA "
                   "graphs on CUDA; aot_eager for a quick CPU check); the profile comes from the eager step")
    args = p.parse_args(argv)
    if min(args.contexts) < 100 or min(args.batches) < 1 or args.layers < 2 or args.gamma < 1 or args.new_tokens < 1:
        p.error("--contexts >= 100, --batches >= 1, --layers >= 2, --gamma >= 1, --new-tokens >= 1")
    if args.budget < 20:
        p.error(f"--budget: expected at least sink + recent = 20 tokens, got {args.budget}")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    positions = max(args.contexts) + max(args.new_tokens, warm_tokens(args.gamma)) + args.gamma
    try:
        args.spec = dataclasses.replace(testbed.sized(args.shape, args.layers, positions, args.seed),
                                        draft_kv_heads=args.draft_kv_heads)
    except ValueError as err:
        p.error(f"the testbed: {err}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out: {err}")
    return args


def write_csv(path: Path, rows: list[dict]) -> None:
    """`rows` as CSV with a header of all their keys; None or a missing key as an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def profile_line(r: dict) -> str:
    """The eager step's profile in a few figures: host against device ms and launches on CUDA, host ops on CPU."""
    line = f"eager {r['ms_per_step_eager']:.2f} ms/step"
    if r["device_ms_per_step"] is not None:
        line += (f" (device {r['device_ms_per_step']:.2f} ms, host-bound {r['host_bound']:.0%}), "
                 f"{r['launches_per_step']:.0f} launches")
    line += f", {r['ops_per_step']:.0f} ops, {r['syncs_per_step']:.1f} syncs per step"
    if r["compile_s"] is not None:
        line += (f"; compile {r['compile_s']:.1f} s, {r['graphs_built']} graph(s), "
                 f"{r['cudagraph_skips']} cudagraph skips")
    return line


def main(argv=None) -> int:
    args = parse(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    spec = args.spec
    bandwidth = copy_gbs(args.device)
    draft, target = testbed.models(spec, device=args.device, dtype=DTYPES[args.dtype])
    rows, top = [], []
    for context in args.contexts:
        for batch in args.batches:
            for name in args.policies:
                try:
                    r, top_rows = measure(spec, draft, target, name, context, batch, args, bandwidth)
                except Exception as err:  # one policy's failure (a compile, a kernel) costs only its own row
                    traceback.print_exc()
                    rows.append({"policy": name, "context": context, "batch": batch,
                                 "error": f"{type(err).__name__}: {err}"})
                    continue
                rows.append(r)
                if context == max(args.contexts) and batch == max(args.batches):
                    top += top_rows
                print(f"context {context:6} batch {batch:3} {name:12} {r['tokens_per_s']:9.1f} tok/s  accept "
                      f"{r['mean_accept']:.2f}  {r['ms_per_step']:8.2f} ms/step  floor {r['floor_fraction']:6.1%}  "
                      f"recall {r['recall']:.0%}  {profile_line(r)}", file=sys.stderr, flush=True)
    meta = {**provenance(args.device, ["tools/bench_e2e.py", *(sys.argv[1:] if argv is None else argv)]),
            "copy_gbs": bandwidth, "testbed": dataclasses.asdict(spec), "dtype": args.dtype, "gamma": args.gamma,
            "budget": args.budget, "new_tokens": args.new_tokens, "compile": args.compile}
    paper = paper_shape()
    (args.out / "bench_e2e.json").write_text(json.dumps({"meta": meta, "rows": rows, "paper_shape": paper}, indent=1))
    write_csv(args.out / "bench_e2e.csv", rows)
    write_csv(args.out / "top_ops.csv", top)
    measured = [r for r in rows if "error" not in r]
    try:
        if measured:
            plot(measured, args.out)
    except ImportError:  # the GPU image has no matplotlib: the JSON / CSV hold every figure
        print("matplotlib is not installed: no plots", file=sys.stderr)
    print("paper shape (computed, H200 kernel timings): step ms " + ", ".join(
        f"{p} {v:.1f}" for p, v in paper["step_ms"].items()))
    for r in paper["rows"]:
        print(f"  acceptance {r['acceptance']:.1f}: Dustin {r['dustin_over_plain']:.2f}x plain decoding, "
              f"{r['dustin_over_dense']:.2f}x dense-verification speculative decoding")
    print(f"wrote {args.out}/bench_e2e.json, .csv and top_ops.csv (and the plots)")
    for r in rows:
        if "error" in r:
            print(f"failed: context {r['context']} batch {r['batch']} {r['policy']}: {r['error']}", file=sys.stderr)
    return 0 if len(measured) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
