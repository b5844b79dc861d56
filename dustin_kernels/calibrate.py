"""Calibrate Dustin's retrieval heads, layers and m for a draft / target pair; writes a JSON profile.

    python -m dustin_kernels.calibrate --target DIR --draft DIR --out profile.json
        [--length 4096] [--samples 8] [--budget 512] [--gamma 4] [--heads 4] [--draft-layers 3] [--trials 30]

1. Retrieval heads: a synthetic needle in a haystack, in token-id space so that it works for any
   tokenizer: random ids, a random needle span of 16 ids at a random depth, and at the end the needle's
   first 4 ids again as the cue; while the models read the rest of the needle (teacher-forced), each
   head's score is its mean attention mass on the needle span. Each layer keeps its `--heads` best.
2. Attention recovery: at sampled verification steps (T = gamma + 1 window tokens at a random point
   of the second half of the haystack, teacher-forced), the share of the target's true dense attention
   mass (all layers, all heads, the window's queries) that falls on the selected history tokens.
3. The target layer: the best by recovery of its S_target alone; then the draft layers, greedily,
   the one that most improves Dustin's recovery (up to `--draft-layers`, while it improves); then m,
   tuned with Optuna (TPE) on the same recovery.
The profile holds the heads, the target layer, m, and the recoveries it measured.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import attention_scores, select_tokens
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
    """Signals of both models at sampled verification steps, and the recovery of a selection."""

    def __init__(self, draft, target, ids, history, gamma, draft_heads, target_heads):
        self.T, self.history = gamma + 1, history.to(target.device)
        rows = self.T + 1  # the last committed token, then the window
        start = self.history - 1
        dc, dq = window_queries(draft, ids.to(draft.device), start, rows)
        tc, tq = window_queries(target, ids.to(target.device), start, rows)
        seq_lens = (self.history + self.T).to(torch.int32)
        self.seq_lens = seq_lens
        self.true = sum(attention_scores(q[:, :, 1:], tc.k[layer], seq_lens) for layer, q in tq.items())
        self.true_total = sum(float(self.true[b, :h].sum()) for b, h in enumerate(self.history.tolist()))
        self.s_draft = {layer: attention_scores(q[:, :, 2:], dc.k[layer], seq_lens, heads=draft_heads[layer])
                        for layer, q in dq.items()}  # the gamma speculated tokens' queries
        self.s_target = {layer: attention_scores(q[:, :, :1], tc.k[layer], self.history.to(torch.int32),
                                                 heads=target_heads[layer]) for layer, q in tq.items()}

    def __call__(self, draft_layers, target_layer, *, budget, m, sink, recent) -> float:
        s_draft = sum(self.s_draft[layer] for layer in draft_layers) if draft_layers else None
        s_target = None if target_layer is None else self.s_target[target_layer]
        idx, count = select_tokens(s_draft, s_target, self.seq_lens, budget=budget, m=m, sink=sink, recent=recent,
                                   window=self.T)
        kept = sum(float(self.true[b, idx[b, :c].long()].sum()) for b, c in enumerate(count.tolist()))
        return kept / self.true_total


def calibrate(draft, target, *, length=4096, samples=8, budget=512, gamma=4, heads=4, draft_layers=3, sink=4,
              recent=16, trials=30, seed=0, vocab=None, say=print) -> dict:
    """The profile (RetrievalProfile JSON plus what was measured) for a model pair."""
    import optuna

    from .policies import _check_budget

    for name, value in (("samples", samples), ("gamma", gamma), ("heads", heads), ("draft_layers", draft_layers),
                        ("trials", trials)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {value!r}")
    _check_budget(budget, sink, recent)
    if length < 2 * budget or length < 8 * (NEEDLE + CUE):
        raise ValueError(f"--length: expected at least 2 x budget = {2 * budget} and {8 * (NEEDLE + CUE)} tokens, "
                         f"got {length}")
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or min(draft.config.vocab_size, target.config.vocab_size)
    ids, needle = haystacks(vocab, length, samples, g)
    scores = {"draft": needle_scores(draft, ids, needle), "target": needle_scores(target, ids, needle)}
    top = {who: {layer: tuple(sorted(s[layer].topk(min(heads, s.shape[1])).indices.tolist()))
                 for layer in range(s.shape[0])} for who, s in scores.items()}
    say(f"needle scores: best draft head {scores['draft'].max():.3f}, best target head {scores['target'].max():.3f}")

    history = torch.randint(length // 2, length - gamma - 1, (samples,), generator=g)
    recovery = Recovery(draft, target, ids, history, gamma, top["draft"], top["target"])
    quotas = dict(budget=budget, sink=sink, recent=recent)
    m0 = budget // 4
    by_layer = {layer: recovery((), layer, m=0, **quotas) for layer in range(target.config.num_layers)}
    target_layer = max(by_layer, key=by_layer.get)
    chosen, best = [], by_layer[target_layer]
    while len(chosen) < min(draft_layers, draft.config.num_layers):
        trial = {layer: recovery(chosen + [layer], target_layer, m=m0, **quotas)
                 for layer in range(draft.config.num_layers) if layer not in chosen}
        layer = max(trial, key=trial.get)
        if chosen and trial[layer] <= best:
            break
        chosen.append(layer)
        best = trial[layer]
    free = budget - sink - recent
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.enqueue_trial({"m": min(m0, free)})
    study.optimize(lambda t: recovery(sorted(chosen), target_layer, m=t.suggest_int("m", 0, free), **quotas),
                   n_trials=trials)
    m = study.best_params["m"]
    profile = RetrievalProfile({layer: top["draft"][layer] for layer in sorted(chosen)}, target_layer,
                               top["target"][target_layer], m)
    measured = {"dustin": study.best_value, "target_only": by_layer[target_layer],
                "draft_only": recovery(sorted(chosen), None, m=0, **quotas),
                "streaming": recovery((), target_layer, m=0, budget=budget, sink=sink, recent=budget - sink)}
    say(f"target layer {target_layer}, draft layers {sorted(chosen)}, m {m}; attention recovery at budget {budget}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in measured.items()))
    return profile.to_json(recovery=measured, budget=budget, sink=sink, recent=recent, gamma=gamma,
                           calibration={"length": length, "samples": samples, "seed": seed, "trials": trials},
                           needle_scores={k: v.tolist() for k, v in scores.items()})


def main(argv=None) -> int:
    from .generate import load_pair

    p = argparse.ArgumentParser(prog="python -m dustin_kernels.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="target checkpoint folder")
    p.add_argument("--draft", required=True, help="draft checkpoint folder")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--length", type=int, default=4096, help="haystack tokens")
    p.add_argument("--samples", type=int, default=8, help="haystacks (and verification steps) per measurement")
    p.add_argument("--budget", type=int, default=512)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="retrieval heads kept per layer")
    p.add_argument("--draft-layers", type=int, default=3)
    p.add_argument("--trials", type=int, default=30, help="Optuna trials for m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        draft, target, tokenizer = load_pair(args.target, args.draft, dtype=args.dtype and DTYPES[args.dtype],
                                             device=device)
        profile = calibrate(draft, target, length=args.length, samples=args.samples, budget=args.budget,
                            gamma=args.gamma, heads=args.heads, draft_layers=args.draft_layers, sink=args.sink,
                            recent=args.recent, trials=args.trials, seed=args.seed, vocab=tokenizer.get_vocab_size())
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
