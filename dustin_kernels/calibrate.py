"""Calibrate Dustin's retrieval heads, layers and m for a draft / target pair; writes a JSON profile.

    python -m dustin_kernels.calibrate --target DIR --draft DIR --out profile.json
        [--policy dustin|dustin-paper] [--length 4096] [--samples 8] [--budget 512] [--gamma 4] [--heads 4]
        [--min-score 0.5] [--draft-layers 3] [--trials 30]

1. Retrieval heads: a synthetic needle in a haystack, in token-id space so that it works for any
   tokenizer: random ids, a random needle span of 16 ids at a random depth, and at the end the needle's
   first 4 ids again as the cue; while the models read the rest of the needle (teacher-forced), each
   head's score is its mean attention mass on the needle span. A head retrieves when its score is at
   least `--min-score` times its model's best; each layer keeps its `--heads` best such heads.
2. Attention recovery: at sampled verification steps (T = gamma + 1 window tokens at a random point
   of the second half of the haystack, teacher-forced), the share of the target's retrieval heads'
   dense attention mass (their window rows, in every layer that has one) that falls on the history the
   policy selects for that layer. Heads that do not retrieve (sinks, local heads) are left out: sink +
   recent serve them, and their mass would drown the few heads that need the right tokens.
3. The target layer: the best by recovery of the target signal alone (for `dustin`, the window queries
   of that layer, which refine the selection there and in later layers; for `dustin-paper`, the last
   committed query); then the draft layers, greedily, the one that most improves the policy's recovery
   (up to `--draft-layers`, while it improves); then m, tuned with Optuna (TPE) on the same recovery.
The profile holds the heads, the target layer, m, and the recoveries it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import attention_scores, select_tokens
from .devices import default_device, device_arg
from .models import DTYPES, Transformer
from .policies import RetrievalProfile

NEEDLE, CUE = 16, 4


def haystacks(vocab: int, length: int, samples: int, g: torch.Generator):
    """(ids int64[samples, length], needle start [samples]): random ids with a needle span of NEEDLE ids
    at a random depth, copied again as the last NEEDLE ids (its first CUE ids are the cue)."""
    ids = torch.randint(vocab, (samples, length), generator=g)
    start = torch.randint(length // 10, length - 2 * NEEDLE, (samples,), generator=g)
    for b, s in enumerate(start.tolist()):
        ids[b, length - NEEDLE:] = ids[b, s:s + NEEDLE]
    return ids, start


@torch.no_grad()
def window_queries(model: Transformer, ids, start, rows: int, chunk: int | None = None):
    """Prefill ids[b, :start[b]] (`chunk` as in `Transformer.prefill`), then one dense pass over
    ids[b, start[b] : start[b] + rows] capturing every layer's queries; returns (cache, {layer: q
    [B, Hq, rows, D]})."""
    B = ids.shape[0]
    cache = model.new_cache(B, int(start.max()) + rows)
    model.prefill(ids[:, : int(start.max())], start, cache, chunk=chunk)
    window = torch.stack([ids[b, s:s + rows] for b, s in enumerate(start.tolist())])
    _, queries = model(window, cache, start.to(torch.int32), capture=range(model.config.num_layers))
    return cache, queries


def needle_scores(model: Transformer, ids, needle_start) -> torch.Tensor:
    """float32 [layers, Hq]: mean attention mass on the needle span while the copy's answer is read."""
    B, L = ids.shape
    dev = model.device
    first = L - NEEDLE + CUE - 1  # rows at the cue's last id .. the copy's second-to-last predict the answer
    rows = NEEDLE - CUE
    cache, queries = window_queries(model, ids.to(dev), torch.full((B,), first, device=dev), rows)
    pos = torch.arange(first + rows, device=dev)
    needle_start = needle_start.to(dev)[:, None]
    span = (pos >= needle_start) & (pos < needle_start + NEEDLE)  # [B, N]
    causal = pos[None, :] <= first + torch.arange(rows, device=dev)[:, None]  # [R, N]
    G = model.config.num_heads // model.config.num_kv_heads
    out = []
    for layer in range(model.config.num_layers):
        k = cache.k[layer].float().repeat_interleave(G, dim=1)  # [B, Hq, N, D]
        logits = queries[layer].float() @ k.transpose(-1, -2) * model.config.head_dim ** -0.5  # [B, Hq, R, N]
        prob = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
        out.append((prob * span[:, None, None]).sum(-1).mean((0, 2)))
    return torch.stack(out).cpu()


class Recovery:
    """Signals of both models at sampled verification steps, and the recovery of a policy's selections."""

    def __init__(self, draft, target, ids, history, gamma, draft_heads, target_heads, refine: bool):
        self.T, self.history, self.refine = gamma + 1, history.to(target.device), refine
        rows = self.T + 1  # the last committed token, then the window
        start = self.history - 1
        dc, dq = window_queries(draft, ids.to(draft.device), start, rows)
        tc, tq = window_queries(target, ids.to(target.device), start, rows)
        self.seq_lens = (self.history + self.T).to(torch.int32)
        self.true = {layer: attention_scores(tq[layer][:, :, 1:], tc.k[layer], self.seq_lens, heads=heads)
                     for layer, heads in target_heads.items()}  # the retrieval heads' mass, per layer
        self.true_total = sum(float(t[b, :h].sum()) for t in self.true.values()
                              for b, h in enumerate(self.history.tolist()))
        self.s_draft = {layer: attention_scores(q[:, :, 1:], dc.k[layer], self.seq_lens, heads=draft_heads[layer])
                        for layer, q in dq.items() if layer in draft_heads}  # the draft's T window queries
        rows, lens = (slice(1, None), self.seq_lens) if refine else (slice(0, 1), self.history.to(torch.int32))
        self.s_target = {layer: attention_scores(tq[layer][:, :, rows], tc.k[layer], lens, heads=heads)
                         for layer, heads in target_heads.items()}  # window queries (refine) or the committed one

    def select(self, s_draft, s_target, **quotas):
        if s_draft is None and s_target is None:  # sink + recent only
            s_target = torch.zeros_like(next(iter(self.true.values())))
        return select_tokens(s_draft, s_target, self.seq_lens, window=self.T, **quotas)

    def __call__(self, draft_layers, target_layer, **quotas) -> float:
        """Recovery of Dustin's selections with these draft layers and target layer (None: no target
        signal); quotas: budget, m, sink, recent."""
        s_draft = sum(self.s_draft[layer] for layer in draft_layers) if draft_layers else None
        s_target = None if target_layer is None else self.s_target[target_layer]
        first = self.select(s_draft, None if self.refine else s_target, **quotas)
        refined = self.select(s_draft, s_target, **quotas) if self.refine and s_target is not None else first
        kept = 0.0
        for layer, true in self.true.items():
            idx, count = refined if target_layer is not None and layer >= target_layer else first
            kept += sum(float(true[b, idx[b, :c].long()].sum()) for b, c in enumerate(count.tolist()))
        return kept / self.true_total


def retrieval_heads(scores: torch.Tensor, heads: int, min_score: float) -> dict[int, tuple[int, ...]]:
    """{layer: q heads} of the heads scoring at least min_score x the best ([layers, Hq] needle scores),
    the `heads` best per layer; layers without one are left out."""
    floor = min_score * float(scores.max())
    chosen = {}
    for layer, row in enumerate(scores):
        top = row.topk(min(heads, row.numel()))
        picked = sorted(h for v, h in zip(top.values.tolist(), top.indices.tolist()) if v >= floor and v > 0)
        if picked:
            chosen[layer] = tuple(picked)
    return chosen


def calibrate(draft, target, *, policy="dustin", length=4096, samples=8, budget=512, gamma=4, heads=4,
              min_score=0.5, draft_layers=3, sink=4, recent=16, trials=30, seed=0, vocab=None, say=print) -> dict:
    """The profile (RetrievalProfile JSON plus what was measured) for a model pair."""
    import optuna

    from .policies import _check_budget

    for name, value in (("samples", samples), ("gamma", gamma), ("heads", heads), ("draft_layers", draft_layers),
                        ("trials", trials)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value!r}")
    if policy not in ("dustin", "dustin-paper"):
        raise ValueError(f"--policy: expected dustin or dustin-paper, got {policy!r}")
    if not 0 < min_score <= 1:
        raise ValueError(f"--min-score: expected a fraction in (0, 1], got {min_score!r}")
    _check_budget(budget, sink, recent)
    if length < 2 * budget or length < 8 * (NEEDLE + CUE):
        raise ValueError(f"--length: expected at least 2 x budget = {2 * budget} and {8 * (NEEDLE + CUE)} tokens, "
                         f"got {length}")
    positions = min(draft.config.max_position_embeddings, target.config.max_position_embeddings)
    if length > positions:
        raise ValueError(f"--length: {length} tokens exceed the models' max_position_embeddings ({positions})")
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or min(draft.config.vocab_size, target.config.vocab_size)
    ids, needle = haystacks(vocab, length, samples, g)
    say(f"scoring heads on {samples} needle haystacks of {length} tokens")
    scores = {"draft": needle_scores(draft, ids, needle), "target": needle_scores(target, ids, needle)}
    found = {who: retrieval_heads(s, heads, min_score) for who, s in scores.items()}
    if not found["target"] or not found["draft"]:
        raise ValueError("no head of the " + " and ".join(w for w, f in found.items() if not f) + " attends to the "
                         "needle: nothing to calibrate")
    say("retrieval heads: " + "; ".join(f"{who} {', '.join(f'layer {k}: {list(v)}' for k, v in f.items())}"
                                        for who, f in found.items()))

    history = torch.randint(length // 2, length - gamma - 1, (samples,), generator=g)
    say(f"measuring attention recovery at {samples} verification steps")
    recovery = Recovery(draft, target, ids, history, gamma, found["draft"], found["target"], policy == "dustin")
    quotas = dict(budget=budget, sink=sink, recent=recent)
    m0 = budget // 4
    by_layer = {layer: recovery((), layer, m=0, **quotas) for layer in found["target"]}
    target_layer = max(by_layer, key=by_layer.get)
    chosen, best = [], by_layer[target_layer]
    while len(chosen) < min(draft_layers, len(found["draft"])):
        trial = {layer: recovery(chosen + [layer], target_layer, m=m0, **quotas)
                 for layer in found["draft"] if layer not in chosen}
        layer = max(trial, key=trial.get)
        if chosen and trial[layer] <= best:
            break
        chosen.append(layer)
        best = trial[layer]
    free = budget - sink - recent
    say(f"tuning m with {trials} Optuna trials")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for m in sorted({0, min(m0, free), free}):  # the default and both ends, then TPE
        study.enqueue_trial({"m": m})
    study.optimize(lambda t: recovery(sorted(chosen), target_layer, m=t.suggest_int("m", 0, free), **quotas),
                   n_trials=trials)
    m = study.best_params["m"]
    profile = RetrievalProfile({layer: found["draft"][layer] for layer in sorted(chosen)}, target_layer,
                               found["target"][target_layer], m)
    measured = {policy: study.best_value, "target_only": by_layer[target_layer],
                "draft_only": recovery(sorted(chosen), None, m=0, **quotas),
                "streaming": recovery((), None, m=0, budget=budget, sink=sink, recent=budget - sink)}
    say(f"target layer {target_layer}, draft layers {sorted(chosen)}, m {m}; recovery of the retrieval heads' "
        f"attention at budget {budget}: " + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    return profile.to_json(policy=policy, recovery=measured, budget=budget, sink=sink, recent=recent, gamma=gamma,
                           calibration={"length": length, "samples": samples, "seed": seed, "trials": trials,
                                        "min_score": min_score},
                           needle_scores={k: v.tolist() for k, v in scores.items()})


def main(argv=None) -> int:
    from .generate import load_pair

    p = argparse.ArgumentParser(prog="python -m dustin_kernels.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target checkpoint folder")
    p.add_argument("--draft", required=True, help="draft checkpoint folder")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--policy", choices=("dustin", "dustin-paper"), default="dustin", help="the selection rule to "
                   "calibrate for (default dustin: the target signal refines the selection at its layer)")
    p.add_argument("--length", type=int, default=4096, help="haystack tokens")
    p.add_argument("--samples", type=int, default=8, help="haystacks (and verification steps) per measurement")
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="retrieval heads kept per layer, at most")
    p.add_argument("--min-score", type=float, default=0.5, help="a retrieval head's needle score, at least this "
                   "fraction of its model's best head's")
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--trials", type=int, default=30, help="Optuna trials for m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    device = args.device or default_device()
    try:
        out = Path(args.out).resolve()
        if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
            raise ValueError(f"--out {args.out}: its folder does not exist or is not writable")
        draft, target, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype and DTYPES[args.dtype],
                                             device=device)
        profile = calibrate(draft, target, policy=args.policy, length=args.length, samples=args.samples,
                            budget=args.budget, gamma=args.gamma, heads=args.heads, min_score=args.min_score,
                            draft_layers=args.draft_layers, sink=args.sink, recent=args.recent, trials=args.trials,
                            seed=args.seed, vocab=tokenizer.get_vocab_size())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    profile["models"] = {"target": str(args.target), "draft": str(args.draft)}
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
