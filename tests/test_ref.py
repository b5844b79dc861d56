"""The float64 references agree with independent formulations (SDPA, definitions by hand)."""
import math

import torch
import torch.nn.functional as F

from dustin_kernels import ref


def _problem(B=2, Hq=4, Hkv=2, T=3, D=8, N=40, lengths=(23, 40)):
    q = torch.randn(B, Hq, T, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64)
    return q, k, v, torch.tensor(lengths, dtype=torch.int32)


def _sdpa(q, k, v, seq_lens):
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out = torch.empty_like(q)
    for b, L in enumerate(seq_lens.tolist()):
        key_pos = torch.arange(L)
        query_pos = torch.arange(L - T, L)
        mask = key_pos[None, :] <= query_pos[:, None]
        kb = k[b, :, :L].repeat_interleave(G, 0)
        vb = v[b, :, :L].repeat_interleave(G, 0)
        out[b] = F.scaled_dot_product_attention(q[b], kb, vb, attn_mask=mask)
    return out


def test_dense_attention_matches_sdpa():
    q, k, v, seq_lens = _problem()
    torch.testing.assert_close(ref.dense_attention(q, k, v, seq_lens), _sdpa(q, k, v, seq_lens))


def test_sparse_verify_with_every_block_is_dense():
    q, k, v, seq_lens = _problem()
    bs, width = 4, 10
    idx = torch.full((2, width), -1, dtype=torch.int32)
    count = torch.zeros(2, dtype=torch.int32)
    for b, L in enumerate(seq_lens.tolist()):
        n = math.ceil((L - 3) / bs)
        idx[b, :n] = torch.arange(n)
        count[b] = n
    torch.testing.assert_close(ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs),
                               ref.dense_attention(q, k, v, seq_lens))


def test_attention_scores_rows_sum_to_one_and_match_probabilities():
    q, k, v, seq_lens = _problem()
    scores = ref.attention_scores(q, k, seq_lens, heads=[1, 2], block_size=1)
    torch.testing.assert_close(scores.sum(1), torch.full((2,), 2 * 3, dtype=torch.float64))
    # block 4 of sequence 0 summed by hand from a single softmax
    b, L, T = 0, 23, 3
    expected = 0.0
    for h in (1, 2):
        for t in range(T):
            p = L - T + t
            probs = torch.softmax(k[b, h // 2, : p + 1] @ q[b, h, t] / math.sqrt(8), 0)
            expected += float(probs[4:8].sum())
    blocks = ref.attention_scores(q, k, seq_lens, heads=[1, 2], block_size=4)
    assert abs(float(blocks[b, 1]) - expected) < 1e-12
    assert float(blocks[0, math.ceil(23 / 4):].abs().sum()) == 0.0  # nothing past seq_lens


def test_select_tokens_rule_by_hand():
    # 30 history blocks, budget 10 = sink 2 + recent 3 + draft 2 + target 3
    s_draft = torch.zeros(1, 32)
    s_draft[0, [7, 9, 11]] = torch.tensor([5.0, 7.0, 5.0])  # 9, then the tie 7 vs 11 goes to 7
    s_target = torch.zeros(1, 32)
    s_target[0, [7, 20, 21, 22, 28]] = torch.tensor([9.0, 3.0, 1.0, 3.0, 9.0])  # 7 taken; 28 is recent
    idx, count = ref.select_tokens(s_draft, s_target, torch.tensor([35]), budget=10, m=2, sink=2, recent=3,
                                   window=5)
    assert count.tolist() == [10]
    assert idx[0].tolist() == [0, 1, 7, 9, 20, 21, 22, 27, 28, 29]
