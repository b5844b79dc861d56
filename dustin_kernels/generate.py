"""Speculative decoding with Dustin sparse verification, from Hugging Face checkpoint folders.

    python -m dustin_kernels.generate --target DIR --draft DIR --prompt "..." [--prompt ... | --prompt-file F]
        [--policy dustin | --policy plain dense dustin streaming] [--budget 512] [--m M] [--profile FILE]
        [--gamma 4] [--max-new-tokens 128] [--temperature 0] [--top-p 1] [--seed 0] [--device cuda]
        [--dtype bf16] [--fidelity] [--json]
    python -m dustin_kernels.generate --demo [--fidelity] [--json]

A folder holds config.json (Llama or Qwen2 / Qwen2.5), model.safetensors or sharded *.safetensors with
model.safetensors.index.json, and tokenizer.json; the two models must share the tokenizer. Several
prompts form a batch (ragged lengths are fine). --temperature 0 is greedy. Several --policy names
run one after the other on the same batch and print a table side by side ('plain': the target
alone); token agreement is counted against the first one named. Stats: the acceptance
length (tokens per verification: accepted drafts + 1) histogram and mean, new tokens per second, and
the KV bytes the verification reads against dense verification. --fidelity also measures every sparse
step against dense verification (`dustin_kernels/fidelity.py`: attention mass kept, its recall of each
row's top-k mass, attention output error, greedy agreement; same tokens, slower, so no speed figures).
--demo needs no download: it builds the retrieval testbed (`dustin_kernels/testbed.py`: a hand-built
model pair whose heads really retrieve; tiny by default, --shape and --layers for a preset's
attention shape) and runs plain decoding and every policy (or --policy) on the same batch of --batch
needle prompts of up to --context tokens, with the recall of the values each prompt asks for
(--max-new-tokens, --gamma, --budget, --m, --sink, --recent, --seed, --temperature, --device, --dtype,
--fidelity, --profile apply).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap

import torch

from . import testbed
from .devices import default_device, device_arg
from .models import DTYPES, ModelConfig, load_model, load_tokenizer
from .policies import POLICIES, TARGET_SIGNAL, RetrievalProfile, make_policy
from .shapes import PRESETS
from .speculative import Sampler, generate


def load_pair(target_dir, draft_dir, *, dtype=None, device="cpu"):
    """(draft, target, tokenizer) from two checkpoint folders that share a tokenizer."""
    tok_t, tok_d = load_tokenizer(target_dir), load_tokenizer(draft_dir)
    vocab_t, vocab_d = tok_t.get_vocab(with_added_tokens=True), tok_d.get_vocab(with_added_tokens=True)
    if vocab_t != vocab_d:
        raise ValueError(f"--draft {draft_dir} and --target {target_dir} have different vocabularies "
                         f"({len(vocab_d)} and {len(vocab_t)} tokens, or different ids): speculative decoding "
                         "needs one tokenizer")
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    target = load_model(target_dir, dtype=dtype, device=device)
    draft = load_model(draft_dir, dtype=dtype, device=device)
    n = min(target.config.vocab_size, draft.config.vocab_size)
    if max(vocab_t.values(), default=-1) >= n:
        raise ValueError(f"tokenizer.json of {target_dir} has ids up to {max(vocab_t.values())}, beyond the "
                         f"models' vocab_size {n}")
    return draft, target, tok_t


NEEDS_PROFILE = {"dustin", "dustin-paper", "draft-only", "target-only"}


def build_policies(args, draft_cfg: ModelConfig, target_cfg: ModelConfig, say=print, profile=None) -> dict:
    """{name: policy} of --policy ('plain': None), with `profile`, else the retrieval profile of --profile,
    else the documented default (said once). Bad --budget / --m / --sink / --recent fail here, before
    decoding."""
    if NEEDS_PROFILE & set(args.policy) and profile is None:
        if args.profile:
            profile = RetrievalProfile.load(args.profile, draft_cfg, target_cfg)
        else:
            profile = RetrievalProfile.default(draft_cfg, target_cfg)
            say(f"no --profile: default retrieval heads (all q heads of draft layers {sorted(profile.draft_heads)} "
                f"and of target layer {profile.target_layer}); run `python -m dustin_kernels.calibrate` for "
                "calibrated ones")
    budget = (64 if args.demo else 512) if args.budget is None else args.budget
    return {name: None if name == "plain" else make_policy(
        name, profile, budget=budget, m=args.m, sink=args.sink, recent=args.recent,
        estimate_every=args.estimate_every if name in TARGET_SIGNAL else 1) for name in args.policy}


def run_policy(draft, target, ids, policy, args, *, eos_ids=None, progress=False, max_len=None):
    """One generation of the batch `ids` with `policy` (None: plain decoding by the target alone)."""
    device = target.device
    sampler = Sampler(args.temperature, args.top_p, torch.Generator(device).manual_seed(args.seed))
    common = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, eos_ids=eos_ids, progress=progress,
                  fidelity=args.fidelity, compile=args.compile, max_len=max_len)
    if policy is None:
        return generate(None, target, ids, gamma=0, **common)
    return generate(draft, target, ids, gamma=args.gamma, policy=policy, **common)


def compare(draft, target, ids, policies: dict, args, *, eos_ids=None, decode=None) -> list[dict]:
    """The batch under each policy in turn: a row per policy (stats, share of tokens equal to the first
    policy's, the tokens and, with `decode`, the first sequence's text). Each policy first runs one
    untimed step on the same batch and caches of the same size, so that its kernels' (and with --compile,
    its step's) compilation stays out of its tokens/s."""
    rows, reference = [], None
    warm_up = argparse.Namespace(**{**vars(args), "max_new_tokens": 1, "fidelity": False})
    max_len = max(map(len, ids)) + args.max_new_tokens + args.gamma
    for i, (name, policy) in enumerate(policies.items()):
        print(f"[{i + 1}/{len(policies)}] {name}", file=sys.stderr, flush=True)
        run_policy(draft, target, ids, policy, warm_up, eos_ids=eos_ids, max_len=max_len)
        result = run_policy(draft, target, ids, policy, args, eos_ids=eos_ids, max_len=max_len)
        if reference is None:
            reference = result.tokens
        same = sum(a == b for r, t in zip(reference, result.tokens) for a, b in zip(r, t))
        rows.append({**result.stats.to_json(), "policy": name, "token_ids": result.tokens,
                     "same_as_first": same / max(sum(map(len, reference)), 1)}
                    | ({"text": decode(result.tokens[0])} if decode else {}))
    return rows


def print_table(rows: list[dict], fidelity: bool) -> None:
    """The policies side by side (see `compare`)."""
    first, recall = rows[0]["policy"], "recall" in rows[0]
    print(f"{'policy':13}" + (f" {'recall':>7}" if recall else "") + f" {'accept len':>10} {'tokens/s':>9} "
          f"{'KV read vs dense':>17} {'same as ' + first:>21}"
          + (f" {'mass kept':>10} {'top-k recall':>12} {'attn error':>10} {'agreement':>10}" if fidelity else ""))
    for r in rows:
        f = r["fidelity"]
        print(f"{r['policy']:13}" + (f" {r['recall']:7.1%}" if recall else "")
              + f" {r['mean_accept']:10.2f} {r['steady_tokens_per_s']:9.1f} {r['kv_fraction']:17.1%}"
              + f" {r['same_as_first']:21.1%}"
              + (f" {f['mass_kept']:10.2%} {f['topk_recall']:12.2%} {f['output_error']:10.4f} "
                 f"{f['greedy_agreement']:10.1%}" if f else ""))
    print(textwrap.fill(
        "accept len: tokens per verification; tokens/s: over the steps after the first (with --compile on CUDA "
        "the first records the step's CUDA graph for the run's new caches); KV read: the verification's K/V "
        "bytes plus the scores' K bytes, "
        "against dense verification (above 100% where the budget covers the history: the scores come on top)"
        + ("; fidelity (sparse policies, against dense attention on the same inputs, every target layer): mass "
           "kept = dense attention mass on the keys read; top-k recall = that over the mass of as many keys of "
           "largest weight; attn error = relative L2 error of the attention output; agreement = window positions "
           "whose greedy token a dense-verified pass also gives; tokens/s include this dense probe"
           if fidelity else "") + ".", 110))
    if "text" in rows[0]:
        print("first sequence's new text, per policy:")
        for r in rows:
            print(f"  {r['policy']:13} {r['text'][:90]}")


def format_stats(stats) -> list[str]:
    hist = " ".join(f"{k + 1}:{c}" for k, c in enumerate(stats.accept_hist))
    ms_per_step, tokens_per_s = stats.steady()
    return [f"acceptance length: mean {stats.mean_accept:.2f} tokens per verification ({stats.steps} steps); "
            f"histogram {hist}",
            f"speed: {stats.tokens_per_s:.1f} new tokens/s ({stats.new_tokens} tokens, "
            f"prefill {stats.prefill_s:.2f} s, decode {stats.decode_s:.2f} s); after the first step "
            f"{tokens_per_s:.1f} tokens/s, {ms_per_step:.2f} ms per step",
            f"verification KV bytes: {stats.kv_fraction:.1%} of dense ({stats.kv_read_bytes / 2**20:.1f} MiB read "
            f"+ {stats.score_bytes / 2**20:.2f} MiB scores vs {stats.kv_dense_bytes / 2**20:.1f} MiB dense)"] + (
        [format_fidelity(stats.fidelity)] if stats.fidelity else [])


def format_fidelity(f: dict) -> str:
    return (f"fidelity vs dense verification ({f['rows']} attention rows, {f['positions']} window positions): "
            f"attention mass kept {f['mass_kept']:.1%} (min {f['min_mass_kept']:.1%}), recall of the top-k mass "
            f"{f['topk_recall']:.1%}, output error {f['output_error']:.3f} (max {f['max_output_error']:.3f}), "
            f"greedy agreement {f['greedy_agreement']:.1%} (tokens/s include the dense probe)")


def run(args) -> dict:
    device = args.device or default_device()
    prompts = []
    for kind, value in args.prompts or []:  # in the order given
        if kind == "file":
            with open(value, encoding="utf-8") as f:
                value = f.read()
        prompts.append(value)
    if not prompts:
        raise ValueError("--prompt / --prompt-file: give at least one prompt")
    draft, target, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype and DTYPES[args.dtype],
                                         device=device)
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    policies = build_policies(args, draft.config, target.config, say)
    ids = [tokenizer.encode(p).ids for p in prompts]
    positions = min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
    if args.max_len is not None and args.max_len > positions:
        raise ValueError(f"--max-len: {args.max_len} exceeds the models' max_position_embeddings ({positions})")
    cap = args.max_len or positions
    for b, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompt {b}: encodes to no tokens")
        if len(p) + args.max_new_tokens + args.gamma > cap:
            raise ValueError(f"prompt {b}: {len(p)} tokens + --max-new-tokens {args.max_new_tokens} + --gamma "
                             f"{args.gamma} do not fit the cache of {cap} positions (--max-len; default: the models' "
                             "max_position_embeddings)")

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True)

    if len(policies) > 1:
        rows = compare(draft, target, ids, policies, args, decode=decode)
        if not args.json:
            print_table(rows, args.fidelity)
        return {"prompt_tokens": [len(i) for i in ids], "rows": rows,
                "policies": {name: _policy_json(p) for name, p in policies.items() if p is not None}}
    ((name, policy),) = policies.items()
    progress = not args.json and args.max_new_tokens * len(ids) >= 256
    result = run_policy(draft, target, ids, policy, args, progress=progress)
    sequences = [{"prompt": p, "prompt_tokens": len(i), "token_ids": t, "text": decode(t)}
                 for p, i, t in zip(prompts, ids, result.tokens)]
    if not args.json:
        for b, s in enumerate(sequences):
            print(f"--- sequence {b} ({s['prompt_tokens']} prompt tokens, {len(s['token_ids'])} new) ---")
            print(s["text"])
        print("--- stats ---")
        print("\n".join(format_stats(result.stats)))
        if args.fidelity and result.stats.fidelity is None:
            print(f"fidelity: nothing to measure, {name!r} reads every history token")
    return {"sequences": sequences, "stats": result.stats.to_json(),
            "policy": _policy_json(policy) if policy is not None else {"name": "plain"}}


def _policy_json(policy) -> dict:
    keys = ("name", "budget", "m", "sink", "recent", "block_size")
    return {k: getattr(policy, k) for k in keys if hasattr(policy, k)} | {
        "draft_heads": {str(k): list(v) for k, v in policy.draft_heads.items()},
        "target_heads": {str(k): list(v) for k, v in policy.target_heads.items()}}


def demo(args) -> dict:
    """The policies side by side on the retrieval testbed (`testbed.py`): each prompt asks for the values
    of one planted needle, which the target copies only if its attention reaches the needle."""
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    device = torch.device(args.device or "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: more CPU threads only add synchronisation
    spec = testbed.sized(args.shape, args.layers, args.context + args.max_new_tokens + args.gamma, args.seed)
    shape = spec.shape
    draft, target = testbed.models(spec, device=device, dtype=dtype)
    prompts = [testbed.prompt(spec, n, seed=args.seed + b) for b, n in enumerate(demo_lengths(args.context, args.batch))]
    ids, expected = [p for p, _ in prompts], [v for _, v in prompts]
    profile = RetrievalProfile.load(args.profile, draft.config, target.config) if args.profile else testbed.profile(spec)
    policies = build_policies(args, draft.config, target.config, profile=profile)
    budget = next((p.budget for p in policies.values() if hasattr(p, "budget")), None)
    tokenizer = testbed.tokenizer(spec)
    say(textwrap.fill(
        f"dustin_kernels demo: the retrieval testbed, a hand-built model pair whose attention really retrieves "
        f"(no download). Each prompt holds filler words, 4 needles (a key word and 8 value words) and, last, one "
        f"needle's key: the target answers with that needle's values, which it can only copy by attending to "
        f"them. Target: {shape.layers}-layer {spec.family} ({shape.q_heads} q / {shape.kv_heads} KV heads of "
        f"{shape.head_dim}); draft: 2 layers, a noisier copy of its retrieval heads. Batch of {len(ids)} prompts "
        f"({', '.join(str(len(i)) for i in ids)} tokens), {args.max_new_tokens} new tokens, gamma {args.gamma}"
        + (f", budget {budget} history tokens" if budget else "")
        + (", greedy" if args.temperature == 0 else f", temperature {args.temperature}")
        + f", {device}, {str(dtype).removeprefix('torch.')}. Retrieval heads: "
        + (f"{args.profile}." if args.profile else "the testbed's own (what `calibrate` finds on it)."), 110))
    rows = compare(draft, target, ids, policies, args, eos_ids=(), decode=tokenizer.decode)
    for row in rows:
        row["recall"] = sum(map(testbed.recall, row["token_ids"], expected)) / len(expected)
    if not args.json:
        print_table(rows, args.fidelity)
        print(f"asked for: {tokenizer.decode(expected[0])}")
        print(textwrap.fill(
            "recall: share of the asked values generated in place. plain: the target alone; dense: speculative "
            "decoding with dense verification. Timings of small models on a CPU only show the mechanics; the "
            "speedups need a GPU and long contexts (--device cuda --shape qwen2.5-7b --layers 12 --context 32768 "
            "--batch 4 --budget 512).", 110))
    return {"demo": True, "testbed": dataclasses.asdict(spec), "prompt_tokens": [len(i) for i in ids],
            "expected": expected, "rows": rows}


def demo_lengths(context: int, batch: int) -> list[int]:
    """Prompt lengths of the demo batch: `context` tokens down to 0.7 * context (ragged)."""
    return [context - (3 * context * i) // (10 * max(batch - 1, 1)) for i in range(batch)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dustin_kernels.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="the retrieval testbed pair, built on the fly; policies side "
                   "by side")
    p.add_argument("--shape", choices=sorted(PRESETS), help="--demo: the target's attention shape (hidden = q "
                   "heads x head dim; default 4 q / 2 KV heads of 64)")
    p.add_argument("--layers", type=int, help="--demo: target layers (default 4; the draft has 2)")
    p.add_argument("--context", type=int, default=4096, help="--demo: tokens of the longest prompt (default 4096)")
    p.add_argument("--batch", type=int, default=2, help="--demo: prompts, from --context down to 0.7x (default 2)")
    p.add_argument("--target", help="target checkpoint folder")
    p.add_argument("--draft", help="draft checkpoint folder")
    p.add_argument("--prompt", action="append", dest="prompts", type=lambda s: ("text", s),
                   help="a prompt (repeat for a batch; with --prompt-file, in the order given)")
    p.add_argument("--prompt-file", action="append", dest="prompts", type=lambda s: ("file", s),
                   help="a file holding one prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128; 8 (the asked values) with --demo")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per step (the target verifies gamma + 1)")
    p.add_argument("--policy", nargs="+", action="extend", choices=("plain",) + POLICIES, default=None,
                   help="verification policy, or several to compare side by side ('plain': the target alone; "
                        "default dustin; with --demo all of them)")
    p.add_argument("--budget", type=int, default=None, help="history tokens the sparse verification reads "
                   "(default 512; 64 with --demo)")
    p.add_argument("--m", type=int, default=None, help="tokens chosen by the draft lookahead (default: the "
                   "profile's, else budget // 4)")
    p.add_argument("--estimate-every", type=int, default=1, metavar="K", help="estimate the target signal every K "
                   f"steps, reusing the last estimate in between ({', '.join(TARGET_SIGNAL)}; default 1)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--profile", help="retrieval-head profile JSON from `python -m dustin_kernels.calibrate`")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu (--demo: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--max-len", type=int, default=None, help="cache positions (default: max_position_embeddings)")
    p.add_argument("--compile", action="store_true", help="run each speculative step as one compiled graph "
                   "(torch.compile fullgraph; CUDA graphs on CUDA); without --fidelity")
    p.add_argument("--fidelity", action="store_true", help="also measure each sparse verification against dense "
                   "verification (attention mass kept, top-k recall, output error, greedy agreement; slower)")
    p.add_argument("--json", action="store_true", help="print one JSON object (sequences and stats)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or args.gamma < 1:
        p.error("--max-new-tokens and --gamma must be >= 1")
    if not args.demo and not (args.target and args.draft):
        p.error("--target and --draft are required (or --demo)")
    if args.max_len is not None and args.max_len < 1:
        p.error(f"--max-len: expected a positive number of cache positions, got {args.max_len}")
    if args.estimate_every < 1:
        p.error(f"--estimate-every: expected steps >= 1, got {args.estimate_every}")
    if args.compile and args.fidelity:
        p.error("--compile: the compiled step is unprobed: not with --fidelity")
    if args.demo and (args.layers is not None and args.layers < 2 or args.context < 100 or args.batch < 1):
        p.error("--demo: --layers must be >= 2, --context >= 100, --batch >= 1")
    args.policy = list(dict.fromkeys(args.policy or (["plain", *POLICIES] if args.demo else ["dustin"])))
    args.max_new_tokens = args.max_new_tokens or (8 if args.demo else 128)
    try:
        out = demo(args) if args.demo else run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
