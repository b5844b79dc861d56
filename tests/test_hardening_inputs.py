"""Every op, both backends: tensors that require grad are refused naming the argument (inference ops),
and NaN / inf garbage in cache slots past seq_lens, in history blocks not selected, in pages no sequence
uses and in score columns past the history never reaches a result (engines reuse pages)."""
import math

import pytest
import torch

from dustin_kernels import attention_scores, dense_verify, ref, select_tokens, sparse_verify, sparse_verify_paged

from test_sparse_verify import assert_close, make_inputs, paged

BACKENDS = ["torch", "triton"]
LENS, WINDOW, BS = [40, 23], 2, 4  # history blocks of 4 tokens: 10 and 6 (the last one partial)


def garbage(shape):
    """NaN, +inf and -inf in turn."""
    values = torch.tensor([math.nan, math.inf, -math.inf])
    return values[torch.arange(math.prod(shape)) % 3].reshape(shape)


def poison_past(cache, seq_lens):
    """A copy of a [B, H, N, D] cache with garbage in every slot past seq_lens."""
    out = cache.clone()
    for b, length in enumerate(seq_lens.tolist()):
        out[b, :, length:] = garbage(out[b, :, length:].shape)
    return out


def odd_blocks(seq_lens):
    """idx / count selecting the odd history blocks (block 0 is never selected), -1 padded."""
    n = [math.ceil((length - WINDOW) / BS) for length in seq_lens.tolist()]
    idx = torch.full((len(n), max(n)), -1, dtype=torch.int32)
    count = torch.tensor([len(range(1, nb, 2)) for nb in n], dtype=torch.int32)
    for b, nb in enumerate(n):
        idx[b, : count[b]] = torch.arange(1, nb, 2, dtype=torch.int32)
    return idx, count


def poison_unselected(cache, seq_lens, idx, count):
    out = poison_past(cache, seq_lens)
    for b, length in enumerate(seq_lens.tolist()):
        chosen = set(idx[b, : count[b]].tolist())
        for block in range(math.ceil((length - WINDOW) / BS)):
            if block not in chosen:
                rows = slice(block * BS, min(length - WINDOW, (block + 1) * BS))
                out[b, :, rows] = garbage(out[b, :, rows].shape)
    return out


def poison_unused_pages(k_pages, v_pages, table):
    """Garbage in every page no sequence uses; block_table entries past a sequence's pages point there."""
    unused = sorted(set(range(k_pages.shape[0])) - set(table[table >= 0].tolist()))
    for pages in (k_pages, v_pages):
        pages[unused] = garbage(pages[unused].shape)
    table = table.clone()
    table[table < 0] = unused[0]
    return table


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["sparse_verify", "sparse_verify_paged", "dense_verify"])
def test_verify_ignores_garbage_past_seq_lens_and_in_unselected_blocks(backend, op):
    q, k, v, seq_lens = make_inputs(LENS, hkv=1, group=2, window=WINDOW, head_dim=16, n_max=48)
    idx, count = odd_blocks(seq_lens)
    if op == "dense_verify":
        expected = ref.dense_attention(q, k, v, seq_lens)
        out = dense_verify(q, poison_past(k, seq_lens), poison_past(v, seq_lens), seq_lens, backend=backend)
    else:
        expected = ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=BS)
        k_bad, v_bad = (poison_unselected(x, seq_lens, idx, count) for x in (k, v))
        if op == "sparse_verify":
            out = sparse_verify(q, k_bad, v_bad, seq_lens, idx, count, block_size=BS, backend=backend)
        else:
            k_pages, v_pages, table = paged(k_bad, v_bad, seq_lens, 8)
            table = poison_unused_pages(k_pages, v_pages, table)
            out = sparse_verify_paged(q, k_pages, v_pages, table, seq_lens, idx, count, block_size=BS,
                                      backend=backend)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_scores_ignore_garbage_past_seq_lens(backend):
    q, k, _, seq_lens = make_inputs(LENS, hkv=2, group=2, window=WINDOW, head_dim=16, n_max=48)
    out = attention_scores(q, poison_past(k, seq_lens), seq_lens, heads=[0, 3], block_size=BS, backend=backend)
    expected = ref.attention_scores(q, k, seq_lens, [0, 3], BS)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_tokens_ignores_garbage_past_the_history(backend):
    seq_lens = torch.tensor([70, 33], dtype=torch.int32)  # 68 and 31 history blocks of 1 token
    s_draft, s_target = torch.rand(2, 80), torch.rand(2, 80)
    expected = ref.select_tokens(s_draft, s_target, seq_lens, 24, 6, window=WINDOW)
    for scores in (s_draft, s_target):
        for b, length in enumerate(seq_lens.tolist()):
            scores[b, length - WINDOW:] = garbage(scores[b, length - WINDOW:].shape)
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=24, m=6, window=WINDOW, backend=backend)
    assert idx.tolist() == expected[0].tolist() and count.tolist() == expected[1].tolist()


def _op_calls():
    """(name, call(tensors, backend), tensors) of every op on small valid inputs."""
    q, k, v, seq_lens = make_inputs(LENS, hkv=1, group=2, window=WINDOW, head_dim=16, n_max=48)
    idx, count = odd_blocks(seq_lens)
    k_pages, v_pages, table = paged(k, v, seq_lens, 8)
    scores = torch.rand(2, 48)
    return [
        ("attention_scores", lambda t, b: attention_scores(t["q"], t["k_cache"], seq_lens, backend=b),
         {"q": q, "k_cache": k}),
        ("select_tokens", lambda t, b: select_tokens(t["s_draft"], t["s_target"], seq_lens, budget=8, m=2,
                                                     sink=1, recent=1, window=WINDOW, backend=b),
         {"s_draft": scores, "s_target": scores.clone()}),
        ("sparse_verify", lambda t, b: sparse_verify(t["q"], t["k_cache"], t["v_cache"], seq_lens, idx, count,
                                                     block_size=BS, backend=b),
         {"q": q, "k_cache": k, "v_cache": v}),
        ("sparse_verify_paged", lambda t, b: sparse_verify_paged(t["q"], t["k_pages"], t["v_pages"], table, seq_lens,
                                                                 idx, count, block_size=BS, backend=b),
         {"q": q, "k_pages": k_pages, "v_pages": v_pages}),
        ("dense_verify", lambda t, b: dense_verify(t["q"], t["k_cache"], t["v_cache"], seq_lens, backend=b),
         {"q": q, "k_cache": k, "v_cache": v}),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [name for name, _, _ in _op_calls()])
def test_tensors_that_require_grad_are_refused_naming_the_argument(backend, op):
    _, call, tensors = next(c for c in _op_calls() if c[0] == op)
    for name in tensors:
        given = {**tensors, name: tensors[name].clone().requires_grad_()}
        with pytest.raises(ValueError, match=f"^{name}: expected a tensor that does not require grad "
                                             r"\(dustin_kernels ops are inference ops"):
            call(given, backend)
    first = next(iter(tensors))
    with torch.no_grad(), pytest.raises(ValueError, match="require grad"):  # a leaf still requires grad
        call({**tensors, first: tensors[first].clone().requires_grad_()}, backend)
