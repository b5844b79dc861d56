"""A short demo of the three ops on synthetic long-context data (random weights, planted structure).

Each sequence hides budget // 4 "needle" keys (128 by default) that the target's queries attend to;
the draft's queries see the same direction through more noise. The demo selects a budget of history
tokens with Dustin's rule and with a StreamingLLM-style rule (sink + recent), runs sparse
verification and reports what the selection saves against dense verification: KV bytes read,
attention mass kept, output error, and the time of each on this machine's default backend: after one
warm-up call, the median of --repeats timed calls with its spread (20th to 80th percentile), and
speedups as ratios of medians with the range the spreads allow.

    python -m dustin_kernels.demo [--context 16384] [--batch 2] [--budget 512] [--repeats 7]
"""
from __future__ import annotations

import argparse

import torch

from . import attention_scores, dense_verify, select_tokens, sparse_verify
from .devices import default_device, device_arg
from .measurement import QuantileTimer
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


def run(batch: int = 2, context: int = 16384, budget: int = 512, m: int = 128, window: int = 5,
        preset: str = "cpu-small", device: str = "cpu", repeats: int = 7) -> list[dict]:
    """Compare dense, Dustin and streaming verification; returns one row per policy (times: ms, the
    median of `repeats` calls, with ms_p20 / ms_p80 and select_ms likewise)."""
    shape = PRESETS[preset]
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
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
    def timed(verify, select=None) -> dict:
        timer = QuantileTimer(device, repeats)
        ms = timer(verify)
        select_ms = timer(select) if select else (0.0, 0.0, 0.0)
        return dict(ms_p20=ms[0], ms=ms[1], ms_p80=ms[2], select_ms_p20=select_ms[0], select_ms=select_ms[1],
                    select_ms_p80=select_ms[2])

    rows = [dict(policy="dense", history_read=sum(L - T for L in lengths), mass_kept=1.0, max_abs_err=0.0,
                 **timed(lambda: dense_verify(q, k, v, seq_lens)))]
    for name, policy in (("dustin", dustin), ("streaming", streaming)):
        idx, count = policy()
        out = sparse_verify(q, k, v, seq_lens, idx, count)
        kept = sum(
            float(true_mass[b, idx[b, : count[b]].long()].sum() + true_mass[b, L - T:L].sum())
            for b, L in enumerate(lengths)
        ) / float(true_mass.sum())
        rows.append(dict(policy=name, history_read=int(count.sum()), mass_kept=kept,
                         max_abs_err=float((out.float() - dense_out.float()).abs().max()),
                         **timed(lambda: sparse_verify(q, k, v, seq_lens, idx, count), policy)))
    kv_row_bytes = 2 * shape.kv_heads * shape.head_dim * k.element_size()  # K and V of one token
    for row in rows:
        row["kv_mib"] = (row["history_read"] + batch * T) * kv_row_bytes / 2**20
    return rows


def _spread(row: dict, key: str) -> str:
    return f"{row[key]:.2f} [{row[key + '_p20']:.2f}-{row[key + '_p80']:.2f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dustin_kernels.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=16384, help="history tokens of the longest sequence")
    parser.add_argument("--budget", type=int, default=512, help="history tokens each sequence may read")
    parser.add_argument("--m", type=int, default=128, help="tokens chosen by the draft's lookahead")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--device", type=device_arg, default=default_device())
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per op after a warm-up (median, p20-p80)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected an int >= 1, got {args.repeats}")
    rows = run(args.batch, args.context, args.budget, args.m, preset=args.preset, device=args.device,
               repeats=args.repeats)
    shape = PRESETS[args.preset]
    print(f"dustin_kernels demo: {args.batch} sequences, up to {args.context} history tokens, T=5, "
          f"Hq={shape.q_heads} Hkv={shape.kv_heads} D={shape.head_dim}, budget {args.budget}, "
          f"device {args.device} (synthetic data: random keys with planted needles)")
    print(f"times: median of {args.repeats} calls after a warm-up [p20 - p80]; speedup: ratio of medians "
          "[the range the spreads allow]")
    print(f"{'policy':10} {'history read':>12} {'KV MiB':>8} {'mass kept':>9} {'max |err|':>9} "
          f"{'verify ms':>22} {'select ms':>22} {'speedup':>20}")
    dense = rows[0]
    for r in rows:
        speedup = (f"{dense['ms'] / r['ms']:6.1f}x [{dense['ms_p20'] / r['ms_p80']:.1f}-"
                   f"{dense['ms_p80'] / r['ms_p20']:.1f}]")
        print(f"{r['policy']:10} {r['history_read']:12d} {r['kv_mib']:8.2f} {r['mass_kept']:9.3f} "
              f"{r['max_abs_err']:9.4f} {_spread(r, 'ms'):>22} {_spread(r, 'select_ms'):>22} {speedup:>20}")
    saved = 1 - rows[1]["kv_mib"] / dense["kv_mib"]
    print(f"Dustin reads {saved:.1%} fewer KV bytes than dense verification and keeps "
          f"{rows[1]['mass_kept']:.1%} of the attention mass (streaming keeps {rows[2]['mass_kept']:.1%}).")


if __name__ == "__main__":
    main()
