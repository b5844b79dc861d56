"""sparse_verify's split-KV path in the interpreter: the splits merge inside the forward kernel (the last
program to arrive merges, then resets its arrival counter), and the window keys ride as the last tile of
the key stream, wherever the split and tile boundaries fall. Checked against the float64 references."""
import pytest
import torch

from dustin_kernels import VerifyPlan, dense_verify, dispatch, ref, sparse_verify, sparse_verify_paged

from conftest import TOLERANCES
from test_sparse_verify import lse_reference, make_inputs, paged, select, select_all


def config(splits, block_n=16, half=0):
    return {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 1, "num_splits": splits, "HALF_PARTIALS": half}


def assert_close(actual, expected, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def poisoned(k, v, seq_lens, idx, count, window, block_size):
    """Copies of the caches with NaN in every history token not selected and in every slot past seq_lens."""
    k, v = k.clone(), v.clone()
    for b, L in enumerate(seq_lens.tolist()):
        keep = torch.zeros(k.shape[2], dtype=torch.bool)
        for blk in idx[b, : int(count[b])].tolist():
            keep[blk * block_size:(blk + 1) * block_size] = True
        keep[L - window:] = False  # a selected block's tail past the history is the window's, or past seq_lens
        keep[L - window:L] = True
        k[b, :, ~keep] = float("nan")
        v[b, :, ~keep] = float("nan")
    return k, v


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("bs", [1, 16], ids=lambda bs: f"bs{bs}")
def test_splits_merge_in_kernel_ragged_with_stale_nan(splits, bs):
    """Ragged odd lengths, one sequence with count 0 (window only), garbage past count and NaN in every
    unselected cache slot: each split count of the last-program merge equals the float64 reference."""
    T, G = 5, 3
    q, k, v, seq_lens = make_inputs([T + 97, T + 3, T + 61], group=G, window=T, head_dim=40, n_max=T + 110)
    idx, count = select(seq_lens, T, bs, width=7 if bs == 16 else 60, fraction=0.6)
    idx[1], count[1] = -1, 0
    idx = torch.where(torch.arange(idx.shape[1])[None, :] < count[:, None], idx,
                      torch.randint(-9, 10**6, idx.shape, dtype=torch.int32))  # garbage past count
    k_bad, v_bad = poisoned(k, v, seq_lens, idx, count, T, bs)
    with dispatch.override(config(splits), kernel="sparse_verify"):
        out, lse = sparse_verify(q, k_bad, v_bad, seq_lens, idx, count, block_size=bs, return_lse=True,
                                 backend="triton")
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs))
    assert_close(lse, lse_reference(q, k, seq_lens, idx, count, bs))


@pytest.mark.parametrize("count_blocks", [3, 4], ids=["window-straddles-the-splits", "window-alone-in-last-tile"])
def test_window_keys_across_tile_and_split_boundaries(count_blocks):
    """BLOCK_N 16, blocks of 4, idx width 4: the stream has 2 tiles (16 history slots + 5 window keys), one per
    split. With 3 blocks selected the window keys are slots 12..16: split 0 holds four, split 1 one."""
    T = 5
    q, k, v, seq_lens = make_inputs([T + 30, T + 18], group=2, window=T, head_dim=16)
    idx = torch.tensor([[0, 3, 7, 5], [4, 1, 2, 0]], dtype=torch.int32)  # block 4 of sequence 1: tokens 16, 17
    count = torch.full((2,), count_blocks, dtype=torch.int32)
    expected = ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=4)
    for splits in (1, 2):
        with dispatch.override(config(splits), kernel="sparse_verify"):
            out = sparse_verify(q, k, v, seq_lens, idx, count, block_size=4, backend="triton")
        assert_close(out, expected)


@pytest.mark.parametrize("splits", [2, 4])
def test_dense_and_paged_splits_merge_in_kernel(splits):
    T = 3
    q, k, v, seq_lens = make_inputs([T + 70, T + 1, T + 33], group=2, window=T, head_dim=24)
    with dispatch.override(config(splits), kernel="sparse_verify"):
        dense = dense_verify(q, k, v, seq_lens, backend="triton")
        idx, count = select(seq_lens, T, 1, width=50)
        k_pages, v_pages, table = paged(k, v, seq_lens, 8)
        out = sparse_verify_paged(q, k_pages, v_pages, table, seq_lens, idx, count, backend="triton")
    assert_close(dense, ref.dense_attention(q, k, v, seq_lens))
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count))


@pytest.mark.parametrize("splits, half", [(3, 0), (2, 1)], ids=["splits3-fp32-partials", "splits2-half-partials"])
def test_counters_reset_between_runs(splits, half):
    """One plan, one workspace, several launches: each run's last program resets its counters, so every
    layer is merged (a counter left at `splits` would leave the previous layer's output in place)."""
    dtype = torch.float16 if half else torch.float32
    layers = [make_inputs([60, 29], group=4, window=5, head_dim=32, dtype=dtype) for _ in range(3)]
    seq_lens = layers[0][3]
    idx, count = select_all(seq_lens, 5, 4)
    with dispatch.override(config(splits, half=half), kernel="sparse_verify"):
        plan = VerifyPlan(*layers[0][:3], seq_lens, idx, count, block_size=4, backend="triton")
    arrived = plan._resolved[2][2]
    assert arrived.shape == (2 * 2,) and arrived.dtype == torch.int32
    for q, k, v, _ in layers + layers[:1]:
        out = plan.run(q, k, v)
        assert_close(out, ref.dense_attention(q, k, v, seq_lens), dtype)
        assert arrived.eq(0).all()
