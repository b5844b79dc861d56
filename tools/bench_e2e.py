"""End-to-end speculative decoding on the retrieval testbed: tokens/s, acceptance and ms per step per
policy, each step broken down by phase (torch.profiler ranges of `speculative_step` in a second, profiled
run: the draft's passes, selection, the target's attention, the rest of the target, the rest of the
step; their sum is that run's step, slower than the unprofiled one) beside the step's
bytes floor (weights + KV + score bytes at the measured copy bandwidth); and the paper's shape
(Qwen2.5-72B target + 0.5B draft, batch 16, 32K, budget 512) computed from the measured H200 per-op
timings of `tools/results/h200-session2` and the byte counts of the models.

    python tools/bench_e2e.py [--out DIR] [--shape PRESET] [--layers N] [--contexts 2048 4096]
        [--batches 1 4] [--policies plain dense dustin streaming quest] [--budget 64] [--gamma 4]
        [--new-tokens 16] [--device cuda] [--dtype bf16] [--compile]

Writes bench_e2e.json and bench_e2e.csv (a row per context x batch x policy), tokens_per_s.png
(tokens/s against context per policy, a panel per batch) and breakdown.png (ms per step by phase, per
policy, at the largest context and batch) into --out (default: $DUSTIN_CACHE_DIR/bench_e2e). With
--compile the timed steps are compiled graphs (CUDA graphs on CUDA) and the breakdown comes from the
eager step; without it every step is eager. On a CPU the timings show the mechanics, not the
method's speed.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dustin_kernels import codegen, testbed  # noqa: E402
from dustin_kernels.timing import copy_gbs, git_commit  # noqa: E402
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


def phases_ms(run, device) -> dict[str, float]:
    """ms per step by phase of one profiled generation `run()` (the torch.profiler ranges named in
    `policies.PHASES`), and "step": that run's own ms per step (profiling slows it)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        stats = run().stats
    steps = stats.steps
    total = {name: 0.0 for name in PHASES} | {"step": 1e3 * stats.decode_s / steps}
    for event in prof.key_averages():
        for name, label in PHASES.items():
            if event.key == label:
                us = event.device_time_total if device.type == "cuda" and event.device_time_total else event.cpu_time_total
                total[name] += us / 1e3 / steps
    return total


def measure(spec, draft, target, policy_name: str, context: int, batch: int, args, bandwidth: float) -> dict:
    prompts = [testbed.prompt(spec, context, seed=args.seed + b) for b in range(batch)]
    ids, values = [p for p, _ in prompts], [v for _, v in prompts]
    plain = policy_name == "plain"
    policy = make_policy("dense" if plain else policy_name, testbed.profile(spec), budget=args.budget)
    gamma = 0 if plain else args.gamma

    max_len = context + args.new_tokens + gamma  # one cache shape for every run: one compiled graph

    def run(new_tokens, compile=args.compile):
        return generate(None if plain else draft, target, ids, max_new_tokens=new_tokens, gamma=gamma,
                        policy=policy, eos_ids=(), compile=compile, max_len=max_len)

    run(gamma + 1)  # warm-up: kernels (and with --compile, the step's graph) compiled, caches allocated
    result = run(args.new_tokens)
    stats = result.stats
    step_ms = 1e3 * stats.decode_s / stats.steps
    phases = phases_ms(lambda: run(args.new_tokens, compile=False), args.device)  # ranges of the eager step
    floor_ms = step_floor_bytes(stats, draft, target, batch, context, gamma) / (bandwidth * 1e6)
    breakdown = dict(zip(BREAKDOWN, (
        phases["draft"], phases["select"] + phases["refine"], phases["attention"],
        phases["target"] - phases["attention"] - phases["refine"],
        phases["step"] - phases["draft"] - phases["select"] - phases["target"])))
    return {"policy": policy_name, "context": context, "batch": batch, "tokens_per_s": stats.tokens_per_s,
            "mean_accept": stats.mean_accept, "steps": stats.steps, "ms_per_step": step_ms,
            "floor_ms_per_step": floor_ms, "floor_fraction": floor_ms / step_ms,
            "recall": sum(map(testbed.recall, result.tokens, values)) / batch, "kv_fraction": stats.kv_fraction,
            **{f"ms_{k.replace(' ', '_')}": v for k, v in breakdown.items()}}


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
                     "dustin_over_plain": tps["dustin"] / tps["plain"], "dustin_over_dense": tps["dustin"] / tps["dense"]})
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
    ax.set(ylabel="ms per step", title=f"step breakdown, context {last[0]['context']}, batch {last[0]['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "breakdown.png", dpi=110)
    plt.close("all")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=codegen.cache_dir().parent / "bench_e2e")
    p.add_argument("--shape", choices=sorted(PRESETS), help="target attention shape (default: the testbed's)")
    p.add_argument("--layers", type=int, default=4, help="target layers (default 4)")
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
    p.add_argument("--compile", action="store_true", help="time the compiled step (torch.compile fullgraph; CUDA "
                   "graphs on CUDA); the breakdown comes from the eager step")
    args = p.parse_args(argv)
    if min(args.contexts) < 100 or min(args.batches) < 1 or args.layers < 2 or args.gamma < 1 or args.new_tokens < 1:
        p.error("--contexts >= 100, --batches >= 1, --layers >= 2, --gamma >= 1, --new-tokens >= 1")
    if args.budget < 20:
        p.error(f"--budget: expected at least sink + recent = 20 tokens, got {args.budget}")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out: {err}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    spec = testbed.sized(args.shape, args.layers, max(args.contexts) + args.new_tokens + args.gamma, args.seed)
    bandwidth = copy_gbs(args.device)
    draft, target = testbed.models(spec, device=args.device, dtype=DTYPES[args.dtype])
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            for name in args.policies:
                rows.append(measure(spec, draft, target, name, context, batch, args, bandwidth))
                r = rows[-1]
                print(f"context {context:6} batch {batch:3} {name:12} {r['tokens_per_s']:9.1f} tok/s  accept "
                      f"{r['mean_accept']:.2f}  {r['ms_per_step']:8.2f} ms/step  floor {r['floor_fraction']:6.1%}  "
                      f"recall {r['recall']:.0%}", file=sys.stderr, flush=True)
    meta = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "commit": git_commit(ROOT), "date": datetime.datetime.now().astimezone().isoformat(),
            "command": " ".join(sys.argv), "copy_gbs": bandwidth, "testbed": dataclasses.asdict(spec),
            "dtype": args.dtype, "gamma": args.gamma, "budget": args.budget, "new_tokens": args.new_tokens}
    paper = paper_shape()
    (args.out / "bench_e2e.json").write_text(json.dumps({"meta": meta, "rows": rows, "paper_shape": paper}, indent=1))
    with open(args.out / "bench_e2e.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        plot(rows, args.out)
    except ImportError:  # the GPU image has no matplotlib: the JSON / CSV hold every figure
        print("matplotlib is not installed: no plots", file=sys.stderr)
    print("paper shape (computed, H200 kernel timings): step ms " + ", ".join(
        f"{p} {v:.1f}" for p, v in paper["step_ms"].items()))
    for r in paper["rows"]:
        print(f"  acceptance {r['acceptance']:.1f}: Dustin {r['dustin_over_plain']:.2f}x plain decoding, "
              f"{r['dustin_over_dense']:.2f}x dense-verification speculative decoding")
    print(f"wrote {args.out}/bench_e2e.json and .csv (and the plots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
