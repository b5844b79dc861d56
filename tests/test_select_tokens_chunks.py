"""select_tokens' chunk programs and their merge (grid (B, cdiv(W, CHUNK)), the row's last arrival merges):
narrow chunks pinned by `dispatch.override`, exact against ref.select_tokens. Chunks with no candidates
(sink, recent, short rows), ties across chunk boundaries, every draft pick in one chunk, both signals'
picks crowding one chunk, one chunk per row, and the arrival counters back at zero for the next launch."""
import math

import pytest
import torch

from dustin_kernels import codegen, dispatch, ref, select_tokens
from dustin_kernels.spec import KernelSpec


def _config(chunk, tile=16, radix_bits=8):
    return {"CHUNK": chunk, "TILE": tile, "RADIX_BITS": radix_bits, "num_warps": 4, "num_stages": 1}


def _compare(s_draft, s_target, seq_lens, *, budget, m, sink, recent, window, block_size=1, chunk=32, tile=16):
    """Run the triton path at the given chunk width; assert it equals the reference exactly."""
    with dispatch.override(_config(chunk, tile), kernel="select_tokens"):
        idx, count = select_tokens(s_draft, s_target, seq_lens, budget=budget, m=m, sink=sink, recent=recent,
                                   window=window, block_size=block_size, backend="triton")
    want_idx, want_count = ref.select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size)
    assert idx.long().tolist() == want_idx.tolist()
    assert count.long().tolist() == want_count.tolist()
    return idx, count


@pytest.mark.parametrize("signals", ["both", "draft", "target"])
def test_chunks_without_candidates(signals):
    """Chunk 0 and part of chunk 1 are sink blocks, the last chunks recent ones or past a short row's history
    (row 1: 70 history blocks of a 200-column row; row 2 fits its budget): those chunks list nothing."""
    seq_lens = torch.tensor([202, 72, 30], dtype=torch.int32)
    g = torch.Generator().manual_seed(11)
    s_draft, s_target = torch.rand(3, 200, generator=g), torch.rand(3, 200, generator=g)
    pair = {"both": (s_draft, s_target), "draft": (s_draft, None), "target": (None, s_target)}[signals]
    _compare(*pair, seq_lens, budget=60, m=9, sink=40, recent=17, window=2)


@pytest.mark.parametrize("levels", [1, 2])
def test_ties_straddle_chunk_boundaries(levels):
    """Runs of equal scores across the boundaries of 32-block chunks, the quota ending inside a run: the
    merge must take the lowest equal blocks over all chunks, not each chunk's lowest."""
    W = 160
    s_draft = torch.zeros(1, W)
    s_draft[0, 28:37] = 3.0  # 9 equal blocks over the 32 boundary; 5 taken
    s_draft[0, 90:100] = 5.0  # 10 above them
    s_target = torch.zeros(1, W) if levels == 1 else (torch.arange(W) % 2).float()[None]  # all tie / two levels
    s_target[0, 60:70] = 4.0  # over the 64 boundary
    s_target[0, 95] = 9.0  # a draft pick: excluded from the target
    _compare(s_draft, s_target, torch.tensor([W + 1], dtype=torch.int32), budget=40, m=15, sink=2, recent=3,
             window=1)


def test_draft_picks_all_in_one_chunk():
    """Every draft pick lies in chunk 2, where the target also scores highest: that chunk's list holds
    its top m draft keys and its top m + rest target keys (which the draft's picks fill first)."""
    W = 192
    g = torch.Generator().manual_seed(12)
    s_draft = torch.rand(1, W, generator=g)
    s_draft[0, 64:96] += 10.0
    s_target = torch.rand(1, W, generator=g)
    s_target[0, 64:96] += 10.0  # target ranks chunk 2 first too: its top excludes the draft's picks
    idx, _ = _compare(s_draft, s_target, torch.tensor([W + 3], dtype=torch.int32), budget=50, m=12, sink=1,
                      recent=1, window=3)
    assert sum(64 <= j < 96 for j in idx[0].tolist()) == 32  # 12 draft + 20 of the 36 target picks


@pytest.mark.parametrize("chunk, tile", [(16, 16), (48, 16), (64, 64), (4096, 64)],
                         ids=["chunk16", "chunk48-odd", "chunk64-one-tile", "one-chunk"])
def test_chunk_widths_with_ragged_rows_and_ties(chunk, tile):
    """Few-level scores (ties everywhere), ragged rows, block size 16, odd chunk widths, one chunk per row."""
    g = torch.Generator().manual_seed(13)
    bs, W = 16, 150
    seq_lens = torch.tensor([16 * W + 5, 16 * 97 - 3, 16 * 20], dtype=torch.int32)
    s_draft = (torch.rand(3, W, generator=g) * 4).floor()
    s_target = (torch.rand(3, W, generator=g) * 3).floor()
    _compare(s_draft, s_target, seq_lens, budget=36, m=10, sink=3, recent=4, window=5, block_size=bs, chunk=chunk,
             tile=tile)


@pytest.mark.parametrize("m", [0, 31, 47], ids=["m0", "m-part", "m-free"])
def test_quota_extremes_over_chunks(m):
    """m = 0 (the target alone), part of the free budget, all of it (the draft alone), n = budget + 1."""
    g = torch.Generator().manual_seed(14)
    W = 100
    seq_lens = torch.tensor([W + 1, 54], dtype=torch.int32)  # row 1: 53 history blocks, budget + 1
    s_draft, s_target = torch.rand(2, W, generator=g), torch.rand(2, W, generator=g)
    s_draft[:, ::7] = -math.inf
    s_target[:, 3::5] = -0.0  # ties with the +0.0 below
    s_target[:, 4::5] = 0.0
    _compare(s_draft, s_target, seq_lens, budget=52, m=m, sink=2, recent=3, window=1)


def test_arrival_counters_are_zero_after_a_launch(monkeypatch):
    """The last program of each row sets its arrival counter back to 0: after a launch the counters read 0,
    and a second launch with the same workspace (counters and lists) gives the same answer."""
    mod = codegen.load(KernelSpec("select_tokens", "interp"))
    kernel = mod.select_tokens
    calls = []

    class Recorded:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((grid, args, kwargs))
                return kernel[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(mod, "select_tokens", Recorded())
    g = torch.Generator().manual_seed(15)
    seq_lens = torch.tensor([130, 97, 20], dtype=torch.int32)
    s_draft, s_target = torch.rand(3, 128, generator=g), (torch.rand(3, 128, generator=g) * 3).floor()
    idx, count = _compare(s_draft, s_target, seq_lens, budget=30, m=8, sink=2, recent=4, window=2)
    (grid, args, kwargs), = calls
    assert grid == (3, 4)
    arrived = args[10]  # arrived_ptr, after list_ptr
    assert arrived.shape == (3,) and arrived.tolist() == [0, 0, 0]
    idx2, count2 = torch.full_like(idx, 777), torch.full_like(count, -5)
    args = list(args)
    args[7], args[8] = idx2, count2
    kernel[grid](*args, **kwargs)  # the same lists and counters: a clean second launch
    assert idx2.tolist() == idx.tolist() and count2.tolist() == count.tolist() and arrived.tolist() == [0, 0, 0]
