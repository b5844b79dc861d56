"""The engine-layout ops against the float64 references, on vLLM-shaped (pages of 16, HND and NHD,
ragged T) and SGLang-shaped (a token pool: pages of 1) tensors, with NaN in every unused page and slot."""
import pytest
import torch

from dustin_kernels import ref
from dustin_kernels import attention_scores_paged, sparse_verify_varlen

Hq, Hkv, D = 4, 2, 16
LENGTHS = [45, 23, 60]  # tokens per request, its query rows included


def paged(lengths, page, layout, g):
    """Dense caches per request [1, Hkv, L, D] and the same K / V scattered into shuffled pages
    (unused pages and slots NaN); returns (dense k, dense v, k_pages, v_pages, block_table)."""
    max_pages = max(-(-n // page) for n in lengths)
    num_pages = len(lengths) * max_pages + 3
    order = torch.randperm(num_pages, generator=g)
    k_pages = torch.full((num_pages, Hkv, page, D), float("nan"))
    v_pages = torch.full_like(k_pages, float("nan"))
    table = torch.full((len(lengths), max_pages), 7, dtype=torch.int32)  # past a request's pages: anything
    ks, vs = [], []
    for b, n in enumerate(lengths):
        k, v = torch.randn(1, Hkv, n, D, generator=g), torch.randn(1, Hkv, n, D, generator=g)
        ks.append(k)
        vs.append(v)
        for p in range(-(-n // page)):
            table[b, p] = physical = int(order[b * max_pages + p])
            rows = slice(p * page, min((p + 1) * page, n))
            k_pages[physical, :, : rows.stop - rows.start] = k[0, :, rows]
            v_pages[physical, :, : rows.stop - rows.start] = v[0, :, rows]
    if layout == "NHD":
        k_pages, v_pages = k_pages.transpose(1, 2).contiguous(), v_pages.transpose(1, 2).contiguous()
    return ks, vs, k_pages, v_pages, table


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("page,layout", [(16, "HND"), (16, "NHD"), (1, "HND")], ids=["vllm-HND", "vllm-NHD", "sglang"])
def test_sparse_verify_varlen_matches_the_reference(page, layout, backend):
    g = torch.Generator().manual_seed(0)
    windows = [3, 5, 3]  # T per request: two groups
    ks, vs, k_pages, v_pages, table = paged(LENGTHS, page, layout, g)
    seq_lens = torch.tensor(LENGTHS, dtype=torch.int32)
    starts = torch.tensor([0] + windows).cumsum(0).to(torch.int32)
    q = torch.randn(int(starts[-1]), Hq, D, generator=g)
    budget = 12
    idx = torch.full((3, budget), -1, dtype=torch.int32)
    count = torch.zeros(3, dtype=torch.int32)
    want = []
    for b, (n, T) in enumerate(zip(LENGTHS, windows)):
        s = torch.rand(1, n, generator=g)
        i, c = ref.select_tokens(s, None, seq_lens[b:b + 1], budget, budget, sink=2, recent=3, window=T)
        idx[b, : i.shape[1]], count[b] = i[0].to(torch.int32), int(c[0])
        qb = q[starts[b]:starts[b + 1]].transpose(0, 1)[None]  # [1, Hq, T, D]
        want.append(ref.sparse_verify(qb, ks[b], vs[b], seq_lens[b:b + 1], i, c)[0].transpose(0, 1))
    got = sparse_verify_varlen(q, k_pages, v_pages, table, seq_lens, starts, idx, count, layout=layout, backend=backend)
    torch.testing.assert_close(got.double(), torch.cat(want), atol=2e-5, rtol=2e-5)
    out = torch.empty_like(q)
    assert sparse_verify_varlen(q, k_pages, v_pages, table, seq_lens, starts, idx, count, layout=layout,
                                backend=backend, out=out) is out
    torch.testing.assert_close(out, got)


@pytest.mark.parametrize("page,layout", [(16, "HND"), (16, "NHD"), (1, "HND")], ids=["vllm-HND", "vllm-NHD", "sglang"])
def test_attention_scores_paged_matches_the_reference(page, layout):
    g = torch.Generator().manual_seed(1)
    ks, _, k_pages, _, table = paged(LENGTHS, page, layout, g)
    seq_lens = torch.tensor(LENGTHS, dtype=torch.int32)
    q = torch.randn(3, Hq, 3, D, generator=g)
    got = attention_scores_paged(q, k_pages, table, seq_lens, heads=[0, 3], layout=layout)
    for b, n in enumerate(LENGTHS):
        want = ref.attention_scores(q[b:b + 1], ks[b], seq_lens[b:b + 1], heads=[0, 3])[0]
        torch.testing.assert_close(got[b, :n].double(), want[:n], atol=1e-5, rtol=1e-5)
        assert not got[b, n:].any()


def test_bad_inputs():
    g = torch.Generator().manual_seed(2)
    _, _, k_pages, v_pages, table = paged(LENGTHS, 16, "HND", g)
    seq_lens = torch.tensor(LENGTHS, dtype=torch.int32)
    q = torch.randn(9, Hq, D)
    idx, count = torch.zeros(3, 4, dtype=torch.int32), torch.ones(3, dtype=torch.int32)
    starts = torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="layout"):
        sparse_verify_varlen(q, k_pages, v_pages, table, seq_lens, starts, idx, count, layout="NCHW")
    with pytest.raises(ValueError, match="query_start_loc"):
        sparse_verify_varlen(q, k_pages, v_pages, table, seq_lens, torch.tensor([0, 3, 6, 8], dtype=torch.int32),
                             idx, count)
    with pytest.raises(ValueError, match="out"):
        sparse_verify_varlen(q, k_pages, v_pages, table, seq_lens, starts, idx, count, out=torch.empty(9, Hq, 8))
    with pytest.raises(ValueError, match="block_table"):
        attention_scores_paged(torch.randn(3, Hq, 3, D), k_pages, table + 100, seq_lens)
