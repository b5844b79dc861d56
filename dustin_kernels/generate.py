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
--demo needs no download: it builds a random model pair on the fly (tiny by default; --shape,
--layers for a preset's attention shape) whose heads are rigged to attend to planted needle words,
and runs plain decoding and every policy (or --policy) on the same batch of --batch prompts of up to
--context tokens (--max-new-tokens, --gamma, --budget, --m, --sink, --recent, --seed, --temperature,
--device, --dtype, --fidelity apply).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap

import torch

from .models import DTYPES, ModelConfig, Transformer, init_random, load_model, load_tokenizer
from .policies import POLICIES, RetrievalProfile, make_policy
from .shapes import PRESETS, AttentionShape
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


def build_policies(args, draft_cfg: ModelConfig, target_cfg: ModelConfig, say=print) -> dict:
    """{name: policy} of --policy ('plain': None), with the retrieval profile of --profile, else the
    documented default (said once). Bad --budget / --m / --sink / --recent fail here, before decoding."""
    profile = None
    if {"dustin", "draft-only", "target-only"} & set(args.policy):
        if args.profile:
            profile = RetrievalProfile.load(args.profile, draft_cfg, target_cfg)
        else:
            profile = RetrievalProfile.default(draft_cfg, target_cfg)
            say(f"no --profile: default retrieval heads (all q heads of draft layers {sorted(profile.draft_heads)} "
                f"and of target layer {profile.target_layer}); run `python -m dustin_kernels.calibrate` for "
                "calibrated ones")
    budget = (64 if args.demo else 512) if args.budget is None else args.budget
    return {name: None if name == "plain" else make_policy(name, profile, budget=budget, m=args.m, sink=args.sink,
                                                           recent=args.recent)
            for name in args.policy}


def run_policy(draft, target, ids, policy, args, *, eos_ids=None, progress=False):
    """One generation of the batch `ids` with `policy` (None: plain decoding by the target alone)."""
    device = target.device
    sampler = Sampler(args.temperature, args.top_p, torch.Generator(device).manual_seed(args.seed))
    common = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, eos_ids=eos_ids, progress=progress,
                  fidelity=args.fidelity)
    if policy is None:
        return generate(None, target, ids, gamma=0, **common)
    return generate(draft, target, ids, gamma=args.gamma, policy=policy, **common)


def compare(draft, target, ids, policies: dict, args, *, eos_ids=None, decode=None) -> list[dict]:
    """The batch under each policy in turn: a row per policy (stats, share of tokens equal to the first
    policy's, the tokens and, with `decode`, the first sequence's text). Each policy first runs one
    untimed step on the same batch, so that its kernels' compilation stays out of its tokens/s."""
    rows, reference = [], None
    warm_up = argparse.Namespace(**{**vars(args), "max_new_tokens": 1, "fidelity": False})
    for name, policy in policies.items():
        run_policy(draft, target, ids, policy, warm_up, eos_ids=eos_ids)
        result = run_policy(draft, target, ids, policy, args, eos_ids=eos_ids)
        if reference is None:
            reference = result.tokens
        same = sum(a == b for r, t in zip(reference, result.tokens) for a, b in zip(r, t))
        rows.append({**result.stats.to_json(), "policy": name, "token_ids": result.tokens,
                     "same_as_first": same / max(sum(map(len, reference)), 1)}
                    | ({"text": decode(result.tokens[0])} if decode else {}))
    return rows


def print_table(rows: list[dict], fidelity: bool) -> None:
    """The policies side by side (see `compare`)."""
    first = rows[0]["policy"]
    print(f"{'policy':12} {'accept len':>10} {'tokens/s':>9} {'KV read vs dense':>17} {'same as ' + first:>21}"
          + (f" {'mass kept':>9} {'top-k recall':>12} {'attn error':>10}" if fidelity else ""))
    for r in rows:
        f = r["fidelity"]
        print(f"{r['policy']:12} {r['mean_accept']:10.2f} {r['tokens_per_s']:9.1f} {r['kv_fraction']:17.1%} "
              f"{r['same_as_first']:21.1%}"
              + (f" {f['mass_kept']:9.2%} {f['topk_recall']:12.2%} {f['output_error']:10.4f}" if f else ""))
    print(textwrap.fill(
        "accept len: tokens per verification; KV read: the verification's K/V bytes plus the scores' K bytes, "
        "against dense verification" + (
            "; fidelity (sparse policies, against dense attention on the same inputs, every target layer): mass "
            "kept = dense attention mass on the keys read; top-k recall = that over the mass of as many keys of "
            "largest weight; attn error = relative L2 error of the attention output; tokens/s include this "
            "dense probe" if fidelity else "") + ".", 110))


def format_stats(stats) -> list[str]:
    hist = " ".join(f"{k + 1}:{c}" for k, c in enumerate(stats.accept_hist))
    return [f"acceptance length: mean {stats.mean_accept:.2f} tokens per verification ({stats.steps} steps); "
            f"histogram {hist}",
            f"speed: {stats.tokens_per_s:.1f} new tokens/s ({stats.new_tokens} tokens, "
            f"prefill {stats.prefill_s:.2f} s, decode {stats.decode_s:.2f} s)",
            f"verification KV bytes: {stats.kv_fraction:.1%} of dense ({stats.kv_read_bytes / 2**20:.1f} MiB read "
            f"+ {stats.score_bytes / 2**20:.2f} MiB scores vs {stats.kv_dense_bytes / 2**20:.1f} MiB dense)"] + (
        [format_fidelity(stats.fidelity)] if stats.fidelity else [])


def format_fidelity(f: dict) -> str:
    return (f"fidelity vs dense verification ({f['rows']} attention rows, {f['positions']} window positions): "
            f"attention mass kept {f['mass_kept']:.1%} (min {f['min_mass_kept']:.1%}), recall of the top-k mass "
            f"{f['topk_recall']:.1%}, output error {f['output_error']:.3f} (max {f['max_output_error']:.3f}), "
            f"greedy agreement {f['greedy_agreement']:.1%} (tokens/s include the dense probe)")


def run(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(args.prompt or [])
    for path in args.prompt_file or []:
        with open(path, encoding="utf-8") as f:
            prompts.append(f.read())
    if not prompts:
        raise ValueError("--prompt / --prompt-file: give at least one prompt")
    draft, target, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype and DTYPES[args.dtype],
                                         device=device)
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    policies = build_policies(args, draft.config, target.config, say)
    ids = [tokenizer.encode(p).ids for p in prompts]
    cap = args.max_len or min(target.config.max_position_embeddings, draft.config.max_position_embeddings)
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


DEMO_TEXT = """speculative decoding lets a small draft model propose a few tokens that a large target model
verifies in one pass . at long context the verification pass is bound by reading the key value cache of
the target . dustin reads only a small well chosen set of history tokens : the first tokens , the most
recent ones , the tokens the draft looks at while it speculates , and the tokens the target looked at
for its last committed token . the window tokens are always attended . the rest is skipped"""


def demo_tokenizer():
    """A word-level tokenizer over the words of DEMO_TEXT (made with the `tokenizers` package)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + sorted(set(DEMO_TEXT.split()))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:3])
    return tok


NEEDLES = ("dustin", "cache", "history")  # demo words that every head of the demo models attends to


DEMO_SHAPE = AttentionShape(8, 2, 32, 6)  # the demo target: hidden 256, 6 layers


def demo_models(vocab: int, needle_ids: list[int], seed: int = 0, late: float = 0.3, shape=DEMO_SHAPE,
                max_len: int = 4096) -> tuple[Transformer, Transformer]:
    """A random Qwen2-style target of `shape` (hidden = q_heads * head_dim, `shape.layers` layers) and,
    as draft, its first 2 layers (self-speculative layer skipping; the later layers' outputs are scaled
    by `late` so that the draft often agrees).

    One planted pattern, so that the choice of history tokens matters as it does in long-context models
    (whose retrieval heads attend to a few history tokens): the embeddings of `needle_ids` share a
    direction u; every layer maps u to a key along the lowest-frequency RoPE pair and gives every query
    a bias along the same pair, so each head puts most of its attention on the needle tokens."""
    heads, kv_heads, dim = shape.q_heads, shape.kv_heads, shape.head_dim
    hidden = heads * dim
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=shape.layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=dim, qkv_bias=True,
                      max_position_embeddings=max_len, family="qwen2")
    target = init_random(Transformer(cfg), seed).eval()
    u = torch.randn(hidden, generator=torch.Generator().manual_seed(seed + 1))
    u /= u.norm()
    c = 24 ** 0.5 * dim ** 0.25  # scaled q.k of about 24 on a needle before the norms shrink it
    with torch.no_grad():
        target.embed_tokens.weight[needle_ids] += 5 * target.embed_tokens.weight.norm(dim=1).mean() * u
        for i, layer in enumerate(target.layers):
            attn = layer.self_attn
            attn.k_proj.weight.view(kv_heads, dim, hidden)[:, dim // 2 - 1] += c * u / hidden ** 0.5
            attn.q_proj.bias.view(heads, dim)[:, dim // 2 - 1] = c
            if i >= 2:
                attn.o_proj.weight.mul_(late)
                layer.mlp.down_proj.weight.mul_(late)
    draft = Transformer(ModelConfig(**{**cfg.__dict__, "num_layers": 2})).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < 2})
    return draft, target


def demo_lengths(context: int, batch: int) -> list[int]:
    """Prompt lengths of the demo batch: `context` tokens down to 0.7 * context (ragged)."""
    return [context - (3 * context * i) // (10 * max(batch - 1, 1)) for i in range(batch)]


def demo_prompts(tokenizer, lengths=(1000, 700), needles=30, seed=0) -> list[list[int]]:
    """Random demo words with `needles` needle words planted in each prompt (ragged lengths)."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in DEMO_TEXT.split() if w not in NEEDLES]
    prompts = []
    for n in lengths:
        text = [words[i] for i in torch.randint(len(words), (n,), generator=g).tolist()]
        for pos in torch.randperm(n - 40, generator=g)[:needles].tolist():
            text[pos + 20] = NEEDLES[pos % len(NEEDLES)]
        prompts.append(tokenizer.encode(" ".join(text)).ids)
    return prompts


def demo(args) -> dict:
    """The policies side by side on a random model pair with planted needles (its text is noise)."""
    say = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    device = torch.device(args.device or "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: more CPU threads only add synchronisation
    shape = dataclasses.replace(PRESETS[args.shape] if args.shape else DEMO_SHAPE,
                                layers=args.layers or DEMO_SHAPE.layers)
    tokenizer = demo_tokenizer()
    draft, target = demo_models(tokenizer.get_vocab_size(), [tokenizer.token_to_id(w) for w in NEEDLES], args.seed,
                                shape=shape, max_len=max(4096, args.context + args.max_new_tokens + args.gamma + 1))
    draft, target = draft.to(device, dtype), target.to(device, dtype)
    ids = demo_prompts(tokenizer, demo_lengths(args.context, args.batch), seed=args.seed)
    profile = RetrievalProfile.default(draft.config, target.config)
    policies = build_policies(args, draft.config, target.config, say=lambda msg: None)  # the header says it
    budget = next((p.budget for p in policies.values() if hasattr(p, "budget")), None)
    say(textwrap.fill(
        f"dustin_kernels demo: the models have RANDOM weights (made on the fly, no download), so their text is "
        f"noise; every head is rigged to attend mostly to {len(NEEDLES)} 'needle' words planted in the prompts. "
        f"Target: {shape.layers}-layer Qwen2-style model (hidden {shape.q_heads * shape.head_dim}, {shape.q_heads} "
        f"q / {shape.kv_heads} KV heads of {shape.head_dim}); draft: its first 2 layers. Batch of {len(ids)} "
        f"prompts ({', '.join(str(len(i)) for i in ids)} tokens), {args.max_new_tokens} new tokens, gamma "
        f"{args.gamma}" + (f", budget {budget} history tokens" if budget else "")
        + (", greedy" if args.temperature == 0 else f", temperature {args.temperature}")
        + f", {device}, {str(dtype).removeprefix('torch.')}. Default retrieval heads (no profile): all q heads of "
        f"draft layers {sorted(profile.draft_heads)} and of target layer {profile.target_layer}.", 110))
    rows = compare(draft, target, ids, policies, args, eos_ids=(), decode=tokenizer.decode)
    if not args.json:
        print_table(rows, args.fidelity)
        shown = next((r for r in rows if r["policy"] == "dustin"), rows[0])
        print(f"text ({shown['policy']}, noise): {shown['text'][:90]} ...")
        print(textwrap.fill(
            "plain: the target alone; dense: speculative decoding with dense verification."
            + (" Streaming (sink + recent) misses the needles and drifts from the target; Dustin's selection keeps "
               "them." if "streaming" in policies else "")
            + " Timings of small models on a CPU only show the mechanics; the speedups need a GPU and long "
              "contexts (--device cuda --shape qwen2.5-7b --context 32768 --batch 4 --budget 512).", 110))
    return {"demo": True, "random_weights": True, "shape": dataclasses.asdict(shape),
            "prompt_tokens": [len(i) for i in ids], "rows": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dustin_kernels.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="random model pair made on the fly; policies side by side")
    p.add_argument("--shape", choices=sorted(PRESETS), help="--demo: the target's attention shape (hidden = q "
                   "heads x head dim; default 8 q / 2 KV heads of 32)")
    p.add_argument("--layers", type=int, help="--demo: target layers (default 6; the draft is its first 2)")
    p.add_argument("--context", type=int, default=1000, help="--demo: tokens of the longest prompt (default 1000)")
    p.add_argument("--batch", type=int, default=2, help="--demo: prompts, from --context down to 0.7x (default 2)")
    p.add_argument("--target", help="target checkpoint folder")
    p.add_argument("--draft", help="draft checkpoint folder")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", action="append", help="a file holding one prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128; 64 with --demo")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per step (the target verifies gamma + 1)")
    p.add_argument("--policy", nargs="+", action="extend", choices=("plain",) + POLICIES, default=None,
                   help="verification policy, or several to compare side by side ('plain': the target alone; "
                        "default dustin; with --demo all of them)")
    p.add_argument("--budget", type=int, default=None, help="history tokens the sparse verification reads "
                   "(default 512; 64 with --demo)")
    p.add_argument("--m", type=int, default=None, help="tokens chosen by the draft lookahead (default: the "
                   "profile's, else budget // 4)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--profile", help="retrieval-head profile JSON from `python -m dustin_kernels.calibrate`")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (--demo: cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--max-len", type=int, default=None, help="cache positions (default: max_position_embeddings)")
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
    if args.demo and (args.layers is not None and args.layers < 3 or args.context < 50 or args.batch < 1):
        p.error("--demo: --layers must be >= 3 (the draft is the first 2), --context >= 50, --batch >= 1")
    if args.demo and args.profile:
        p.error("--profile: the --demo models are made on the fly; they use the default retrieval heads")
    args.policy = list(dict.fromkeys(args.policy or (["plain", *POLICIES] if args.demo else ["dustin"])))
    args.max_new_tokens = args.max_new_tokens or (64 if args.demo else 128)
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
