"""A short demo of the three ops on synthetic long-context data (random weights, planted structure).

Each sequence hides budget // 4 "needle" keys (128 by default) that the target's queries attend to;
the draft's queries see the same direction through more noise. The demo selects a budget of history
tokens with Dustin's rule and with a StreamingLLM-style rule (sink + recent), runs sparse
verification and reports what the selection saves against dense verification: KV bytes read,
attention mass kept, output error, and the time of each on this machine's default backend.

    python -m dustin_kernels.demo [--context 16384] [--batch 2] [--budget 512]
"""
from __future__ import annotations

import argparse
import time

import torch

from . import attention_scores, dense_verify, select_tokens, sparse_verify
from .shapes import PRESETS, spread_heads


def make_problem(batch: int, context: int, window: int, shape, needles: int, device, dtype, seed: int = 0):
    """Random caches with `needles` planted keys per sequence; returns a dict of tensors."""
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv, D = shape.q_heads, shape.kv_heads, shape.head_dim
    n_max = context + window
    lengths = [n_max - (b * context) // (4 * batch) for b in range(batch)]  # ragged
    k = torch.randn(batch, Hkv, n_max, D, generator=g)
    v = torch.randn(batch, Hkv, n_max, D, generator=g)
    topic = torch.randn(batch, 1, 1, D, generator=g)
    topic = topic / topic.norm(dim=-1, keepdim=True)
    for b, L in enumerate(lengths):
        pos = torch.randperm(L - window, generator=g)[:needles]
        k[b, :, pos] += 4.0 * topic[b, 0]  # needles point along the sequence's topic
    q_target = 3.0 * D ** 0.5 * topic + torch.randn(batch, Hq, window, D, generator=g)
    q_draft = q_target + 2.0 * torch.randn(batch, Hq, window, D, generator=g)  # a noisier proxy
    q_last = q_target[:, :, :1] + torch.randn(batch, Hq, 1, D, generator=g)  # last committed query
    to = dict(device=device, dtype=dtype)
    return dict(q=q_target.to(**to), q_draft=q_draft.to(**to), q_last=q_last.to(**to), k=k.to(**to),
                v=v.to(**to), seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device))


def _median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def run(batch: int = 2, context: int = 16384, budget: int = 512, m: int = 128, window: int = 5,
        preset: str = "cpu-small", device: str = "cpu") -> list[dict]:
    """Compare dense, Dustin and streaming verification; returns one row per policy."""
    shape = PRESETS[preset]
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    p = make_problem(batch, context, window, shape, needles=budget // 4, device=device, dtype=dtype)
    q, k, v, seq_lens = p["q"], p["k"], p["v"], p["seq_lens"]
    retrieval = list(spread_heads(shape.q_heads))
    T, lengths = window, seq_lens.tolist()

    def dustin():
        s_draft = attention_scores(p["q_draft"], k, seq_lens, heads=retrieval)
        # the last committed query sits just before the window; it sees the history only
        s_target = attention_scores(p["q_last"], k, seq_lens - (T - 1), heads=retrieval)
        return select_tokens(s_draft, s_target, seq_lens, budget=budget, m=m, window=T)

    def streaming():
        zeros = torch.zeros(batch, k.shape[2], device=device)
        return select_tokens(None, zeros, seq_lens, budget=budget, m=0, sink=4, recent=budget - 4, window=T)

    dense_out = dense_verify(q, k, v, seq_lens)
    true_mass = attention_scores(q, k, seq_lens)  # [B, N]: dense attention mass per key
    rows = [dict(policy="dense", history_read=sum(L - T for L in lengths), mass_kept=1.0, max_abs_err=0.0,
                 ms=_median_ms(lambda: dense_verify(q, k, v, seq_lens)), select_ms=0.0)]
    for name, policy in (("dustin", dustin), ("streaming", streaming)):
        idx, count = policy()
        out = sparse_verify(q, k, v, seq_lens, idx, count)
        kept = sum(
            float(true_mass[b, idx[b, : count[b]].long()].sum() + true_mass[b, L - T:L].sum())
            for b, L in enumerate(lengths)
        ) / float(true_mass.sum())
        rows.append(dict(policy=name, history_read=int(count.sum()), mass_kept=kept,
                         max_abs_err=float((out.float() - dense_out.float()).abs().max()),
                         ms=_median_ms(lambda: sparse_verify(q, k, v, seq_lens, idx, count)),
                         select_ms=_median_ms(policy)))
    kv_row_bytes = 2 * shape.kv_heads * shape.head_dim * k.element_size()  # K and V of one token
    for row in rows:
        row["kv_mib"] = (row["history_read"] + batch * T) * kv_row_bytes / 2**20
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dustin_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=16384, help="history tokens of the longest sequence")
    parser.add_argument("--budget", type=int, default=512, help="history tokens each sequence may read")
    parser.add_argument("--m", type=int, default=128, help="tokens chosen by the draft's lookahead")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    rows = run(args.batch, args.context, args.budget, args.m, preset=args.preset, device=args.device)
    shape = PRESETS[args.preset]
    print(f"dustin_kernels demo: {args.batch} sequences, up to {args.context} history tokens, T=5, "
          f"Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.head_dim}, budget {args.budget}, "
          f"device {args.device} (synthetic data: random keys with planted needles)")
    print(f"{'policy':10} {'history read':>12} {'KV MiB':>8} {'mass kept':>9} {'max |err|':>9} "
          f"{'verify ms':>9} {'select ms':>9} {'speedup':>8}")
    dense = rows[0]
    for r in rows:
        print(f"{r['policy']:10} {r['history_read']:12d} {r['kv_mib']:8.2f} {r['mass_kept']:9.3f} "
              f"{r['max_abs_err']:9.4f} {r['ms']:9.2f} {r['select_ms']:9.2f} {dense['ms'] / r['ms']:7.1f}x")
    saved = 1 - rows[1]["kv_mib"] / dense["kv_mib"]
    print(f"Dustin reads {saved:.1%} fewer KV bytes than dense verification and keeps "
          f"{rows[1]['mass_kept']:.1%} of the attention mass (streaming keeps {rows[2]['mass_kept']:.1%}).")


if __name__ == "__main__":
    main()
