"""The three ops in a plain PyTorch decode step: draft lookahead, target scores, selection, then sparse
verification in every target layer (random tensors; CPU: the PyTorch backend, CUDA: the Triton kernels).

    python examples/ops_pytorch.py [--device cuda] [--context 16384] [--batch 4]

Prints how much of the history the step read, and checks that with a budget covering the history the
sparse verification equals dense attention (the contract of `sparse_verify`).
"""
import argparse

import torch

from dustin_kernels import attention_scores, dense_verify, select_tokens, sparse_verify


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--context", type=int, default=4096, help="history tokens per sequence")
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args(argv)
    dev, dtype = torch.device(args.device), torch.bfloat16 if args.device == "cuda" else torch.float32
    B, T, layers = args.batch, 5, 4  # T = gamma + 1 window tokens verified per step
    Hq, Hkv, D = 8, 2, 64  # target attention: q heads, KV heads, head dim
    n_max = args.context + T
    seq_lens = torch.full((B,), n_max, dtype=torch.int32, device=dev)  # the window is already in the cache

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype)

    k_cache = [randn(B, Hkv, n_max, D) for _ in range(layers)]
    v_cache = [randn(B, Hkv, n_max, D) for _ in range(layers)]
    q_draft, k_draft = randn(B, 4, T, 32), randn(B, 1, n_max, 32)  # the draft's window queries and cache

    s_draft = attention_scores(q_draft, k_draft, seq_lens, heads=[0, 3])  # draft lookahead [B, N_max]
    q_window = randn(B, Hq, T, D)  # the target's window queries at its retrieval layer
    s_target = attention_scores(q_window, k_cache[1], seq_lens, heads=[2, 5])
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=512, m=128, window=T)
    for layer in range(layers):
        out = sparse_verify(randn(B, Hq, T, D), k_cache[layer], v_cache[layer], seq_lens, idx, count)
    print(f"each target layer read {int(count[0])} of {args.context} history tokens; output {tuple(out.shape)}")

    q = randn(B, Hq, T, D)
    everything = select_tokens(s_draft, s_target, seq_lens, budget=args.context, m=0, window=T)
    full = sparse_verify(q, k_cache[0], v_cache[0], seq_lens, *everything)
    error = float((full.float() - dense_verify(q, k_cache[0], v_cache[0], seq_lens).float()).abs().max())
    print(f"budget = the whole history: max |sparse - dense| = {error:.2e}")
    assert error < (2e-2 if dtype == torch.bfloat16 else 1e-4)


if __name__ == "__main__":
    main()
