"""Retrieval quality table: verification policies x contexts x budgets on the retrieval testbed.

The project's stand-in for the paper's LongBench table. Each prompt of the testbed
(`dustin_kernels/testbed.py`, a hand-built model pair whose attention really retrieves) holds filler
words, 4 planted needles (a key and 8 value words) and, last, one needle's key; the target answers
with that needle's --values values (8), which it can only copy by attending to them. For each (context,
budget, policy) one batch of --prompts prompts of `context` tokens runs through speculative decoding
(greedy, one new token per value, gamma --gamma) with the fidelity probe on; each row holds the recall
of the asked values (share generated in place, mean over the prompts), the acceptance length, the dense attention mass
kept on the keys read, greedy agreement with dense verification and the KV bytes read against dense
verification. Dense verification does not depend on the budget: one row per context (budget empty).
With --estimate-every K .., the policies with a target signal (dustin, dustin-paper, target-only) run
once per K, re-estimating it every K steps (policy label `name/kK` for K > 1); more --values make
longer answers, so that the steps between estimations are many.

    python tools/eval_retrieval.py --out DIR                       # CPU: 2K / 4K / 8K, budgets 32 .. 512
    python tools/eval_retrieval.py --out DIR --contexts 32768 65536 --shape qwen2.5-7b --layers 4 --device cuda
    python tools/eval_retrieval.py --out DIR --policies dustin dustin-paper --estimate-every 1 2 4 8 --values 16

Writes DIR/retrieval.json (provenance and rows), DIR/retrieval.csv, DIR/retrieval.png (recall vs budget,
one panel per context) and DIR/mass_kept.png (attention mass kept vs budget), and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dustin_kernels import measurement, testbed  # noqa: E402
from dustin_kernels.devices import default_device, device_arg  # noqa: E402
from dustin_kernels.models import ModelConfig  # noqa: E402
from dustin_kernels.policies import POLICIES, TARGET_SIGNAL, RetrievalProfile, make_policy  # noqa: E402
from dustin_kernels.shapes import PRESETS  # noqa: E402
from dustin_kernels.spec import DTYPES  # noqa: E402
from dustin_kernels.speculative import generate  # noqa: E402

FIELDS = ("context", "budget", "policy", "estimate_every", "recall", "mean_accept", "mass_kept", "greedy_agreement",
          "kv_fraction", "prompts", "seconds")
FIDELITY = ("mass_kept", "greedy_agreement")  # from stats.fidelity; None for dense (nothing to compare)


# --- arguments ------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python tools/eval_retrieval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the results (created)")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192], help="prompt tokens")
    p.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                   help="history tokens the sparse verification reads (quest: pages of 16 tokens)")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), metavar="POLICY",
                   help=f"any of {', '.join(POLICIES)} (default: all)")
    p.add_argument("--prompts", type=int, default=4, help="needle prompts per batch (default 4)")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument("--values", type=int, default=8, help="values per needle, the tokens of an answer (default 8, "
                   "at most 16: the testbed has 64 value words for 4 needles)")
    p.add_argument("--estimate-every", type=int, nargs="+", default=[1], metavar="K",
                   help="re-estimate the target signal every K steps (dustin, dustin-paper, target-only; default 1)")
    p.add_argument("--shape", choices=sorted(PRESETS), help="the target's attention shape (default: testbed's, "
                   "4 q / 2 KV heads of 64)")
    p.add_argument("--layers", type=int, help="target layers (default 4; the draft has 2)")
    p.add_argument("--device", type=device_arg, default=default_device(), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="testbed weights; prompt i uses seed + i")
    p.add_argument("--profile", type=Path, help="retrieval-head profile JSON (default: the testbed's own heads)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, all checked before any model is built: a bad one exits 2 with a one-line error."""
    p = parser()
    args = p.parse_args(argv)
    args.contexts, args.budgets = sorted(set(args.contexts)), sorted(set(args.budgets))
    args.policies = list(dict.fromkeys(args.policies))
    args.estimate_every = sorted(set(args.estimate_every))
    for name in ("prompts", "gamma", "values"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if min(args.estimate_every) < 1:
        p.error(f"--estimate-every: expected steps >= 1, got {min(args.estimate_every)}")
    if args.layers is not None and args.layers < 2:
        p.error(f"--layers: expected >= 2, got {args.layers}")
    if min(args.budgets) < 1:
        p.error(f"--budgets: expected positive token counts, got {min(args.budgets)}")
    args.dtype = args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")
    args.spec = make_spec(args)
    try:
        testbed.prompt(args.spec, args.contexts[0], values=args.values)
    except ValueError as err:
        p.error(f"--contexts: {args.contexts[0]} tokens (--values {args.values}) cannot hold the needles ({err})")
    try:
        args.retrieval = retrieval_profile(args)
    except (ValueError, FileNotFoundError) as err:
        p.error(f"--profile: {err}")
    for name in args.policies:
        for budget in args.budgets:
            try:
                make_policy(name, args.retrieval, budget=budget)
            except ValueError as err:
                p.error(f"--budgets: {budget} does not suit policy {name} ({err})")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        p.error(f"--out: cannot create the folder ({err})")
    return args


def make_spec(args) -> testbed.TestbedSpec:
    """The testbed pair for this sweep: its cache covers the longest prompt + the new tokens + gamma."""
    return testbed.sized(args.shape, args.layers, max(args.contexts) + args.values + args.gamma, args.seed)


def retrieval_profile(args) -> RetrievalProfile:
    if args.profile is None:
        return testbed.profile(args.spec)
    configs = (ModelConfig.from_hf(config) for config in args.spec.configs())
    return RetrievalProfile.load(args.profile, *configs)


# --- the sweep ------------------------------------------------------------------------------------

def jobs(args) -> list[tuple[int, int | None, str, int]]:
    """(context, budget, policy, estimate_every) in run order; dense once per context (budget None); every
    --estimate-every value for the policies with a target signal, 1 for the others."""
    dense = [(None, "dense", 1)] if "dense" in args.policies else []
    sparse = [(b, name, k) for b in args.budgets for name in args.policies if name != "dense"
              for k in (args.estimate_every if name in TARGET_SIGNAL else [1])]
    return [(c, b, name, k) for c in args.contexts for b, name, k in dense + sparse]


def policy_label(row: dict) -> str:
    """The policy's name, with `/kK` when it re-estimates every K > 1 steps."""
    return row["policy"] + (f"/k{row['estimate_every']}" if row["estimate_every"] > 1 else "")


def measure(draft, target, prompts, policy, args) -> dict:
    """One batch under `policy`: the row's measured fields."""
    ids, expected = zip(*prompts)
    begin = time.perf_counter()
    result = generate(draft, target, list(ids), max_new_tokens=args.values, gamma=args.gamma, policy=policy,
                      eos_ids=(), fidelity=True)
    fidelity = result.stats.fidelity or {}
    return {"recall": sum(map(testbed.recall, result.tokens, expected)) / len(expected),
            "mean_accept": result.stats.mean_accept, **{k: fidelity.get(k) for k in FIDELITY},
            "kv_fraction": result.stats.kv_fraction, "prompts": len(ids),
            "seconds": round(time.perf_counter() - begin, 2)}


def sweep(args) -> list[dict]:
    from tqdm import tqdm

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # small models: more CPU threads only add synchronisation
    draft, target = testbed.models(args.spec, device=device, dtype=DTYPES[args.dtype])
    prompts = {c: [testbed.prompt(args.spec, c, values=args.values, seed=args.seed + i) for i in range(args.prompts)]
               for c in args.contexts}
    rows = []
    with tqdm(jobs(args), file=sys.stderr, unit="run") as bar:
        for context, budget, name, every in bar:
            bar.set_postfix_str(f"context {context} budget {budget or '-'} {name} k {every}")
            policy = make_policy(name, args.retrieval, budget=budget or 0, estimate_every=every)
            rows.append({"context": context, "budget": budget, "policy": name, "estimate_every": every,
                         **measure(draft, target, prompts[context], policy, args)})
    return rows


def provenance(args, argv: list[str]) -> dict:
    """`measurement.provenance` and the sweep's settings."""
    return {**measurement.provenance(torch.device(args.device), ["tools/eval_retrieval.py", *argv]),
            "dtype": args.dtype, "testbed": dataclasses.asdict(args.spec),
            "profile": args.retrieval.to_json(source=args.retrieval.source),
            "gamma": args.gamma, "new_tokens": args.values, "prompts": args.prompts, "seed": args.seed,
            "selection": "make_policy's defaults: sink 4, recent 16, m = budget // 4 unless the profile sets it; "
                         "quest: pages of 16 tokens, budget // 16 of them",
            "fields": {"recall": "share of the asked values generated in place, mean over the prompts",
                       "mean_accept": "tokens per verification (accepted drafts + 1)",
                       "mass_kept": "dense attention mass on the keys read (every target layer, row, head)",
                       "greedy_agreement": "window positions whose greedy token equals dense verification's",
                       "kv_fraction": "verification + score K/V bytes against dense verification",
                       "seconds": "wall time of the batch, fidelity probe included (not a speed figure)"}}


# --- outputs --------------------------------------------------------------------------------------

def write(out: Path, meta: dict, rows: list[dict]) -> None:
    (out / "retrieval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    with (out / "retrieval.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], key: str, label: str, path: Path, meta: dict) -> None:
    """`key` vs budget per policy, one panel per context; dense as a dashed line (mass kept: 1, all keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.2 * len(contexts) + 2, 4), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, context in zip(axes[0], contexts):
        here = [r for r in rows if r["context"] == context]
        for i, name in enumerate(dict.fromkeys(map(policy_label, here))):
            mine = [r for r in here if policy_label(r) == name]
            if name == "dense":
                value = mine[0][key] if mine[0][key] is not None else 1.0
                ax.axhline(value, color="black", linestyle="--", linewidth=1.5, zorder=3, label="dense (every key)")
            else:
                ax.plot([r["budget"] for r in mine], [r[key] for r in mine], label=name, marker="osD^vxP"[i % 7],
                        markersize=9 - i % 7, alpha=0.85)  # shrinking markers: coinciding points stay visible
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_title(f"context {context} tokens")
        ax.set_xlabel("budget (history tokens read)")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="policy")
    shape = meta["testbed"]["shape"]
    fig.suptitle(f"{label[0].upper() + label[1:]} vs verification budget, retrieval testbed (synthetic copy task)\n"
                 f"hand-built {shape['layers']}-layer target ({shape['q_heads']} q / {shape['kv_heads']} KV heads of "
                 f"{shape['head_dim']}), 2-layer draft, {meta['prompts']} prompts per point, gamma {meta['gamma']}, "
                 f"greedy, {meta['device_type']} {meta['dtype']}", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(rows: list[dict]) -> None:
    """Per context: a line per policy, a cell per budget: recall, acceptance length, mass kept."""
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    print("cells: recall / acceptance length / attention mass kept (dense: one run, every key)")
    for context in sorted({r["context"] for r in rows}):
        print(f"\ncontext {context:<6}" + "".join(f"{'budget ' + str(b):>19}" for b in budgets))
        for name in dict.fromkeys(map(policy_label, rows)):
            cells = {r["budget"]: r for r in rows if r["context"] == context and policy_label(r) == name}
            if None in cells:  # dense: every key, whatever the budget
                print(f"  {name:16}{cell(cells[None]):>19}   (reads every key: any budget)")
            else:
                print(f"  {name:16}" + "".join(f"{cell(cells[b]) if b in cells else '':>19}" for b in budgets))


def cell(row: dict) -> str:
    mass = "-" if row["mass_kept"] is None else f"{row['mass_kept']:.0%}"
    return f"{row['recall']:.2f} / {row['mean_accept']:.2f} / {mass}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    begin = time.perf_counter()
    meta = provenance(args, argv)
    rows = sweep(args)
    meta["run_s"] = round(time.perf_counter() - begin, 1)
    write(args.out, meta, rows)
    plot(rows, "recall", "recall of the planted values", args.out / "retrieval.png", meta)
    plot(rows, "mass_kept", "attention mass kept", args.out / "mass_kept.png", meta)
    print_table(rows)
    print(f"\n{len(rows)} runs in {meta['run_s']} s -> {args.out}/retrieval.{{json,csv,png}}, mass_kept.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
