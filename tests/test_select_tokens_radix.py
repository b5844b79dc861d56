"""select_tokens' one-launch radix select: inputs aimed at each of its paths, exact against ref.select_tokens.

The kernel resolves a threshold RADIX_BITS key bits per pass and stops at the first pass whose boundary
bin is taken whole; else it resolves all 32 bits and breaks ties by lower block (draft: a block-order
pass; target: a running rank in the emit). The cases below reach: early stops at the first and at late
passes, full resolution with ties (all equal, few levels, +-0.0, +-inf), keys that differ only in the
lowest mantissa bit, negative and subnormal scores, odd widths, quotas at their extremes, block size 16.
FlashInfer-style invariants (values against the k-th largest, a gather at the chosen blocks) back the
exact comparison where ties make the chosen set depend on the tie rule only.
"""
import math

import pytest
import torch

from dustin_kernels import codegen, dispatch, ref, select_tokens
from dustin_kernels.spec import KernelSpec

BACKENDS = ["torch", "triton"]


def _history(seq_lens, window, block_size):
    return [math.ceil((L - window) / block_size) for L in seq_lens.tolist()]


def _run_and_compare(s_draft, s_target, seq_lens, backend, *, budget, m, sink, recent, window, block_size=1):
    """Run the op; assert it equals the reference exactly and has the contract's format; returns (idx, count)."""
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=budget, m=m, sink=sink, recent=recent,
                               window=window, block_size=block_size, backend=backend)
    want_idx, want_count = ref.select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window, block_size)
    assert idx.dtype == count.dtype == torch.int32
    assert idx.long().tolist() == want_idx.tolist()
    assert count.long().tolist() == want_count.tolist()
    for b, n in enumerate(_history(seq_lens, window, block_size)):
        assert int(count[b]) == min(n, budget)
    return idx, count


def _bits_as_float(bits: torch.Tensor) -> torch.Tensor:
    """float32 scores with the given int32 bit patterns (NaN patterns replaced by their sign's infinity)."""
    s = bits.view(torch.float32).clone()
    return torch.where(s.isnan(), torch.where(bits < 0, -math.inf, math.inf), s)


def _patterns(name: str, B: int, W: int, g: torch.Generator) -> torch.Tensor:
    """[B, W] float32 scores of a named pattern."""
    u = torch.rand(B, W, generator=g)
    if name == "random":  # distinct keys: a pass stops once the boundary block is alone in its bin
        return u
    if name == "all-equal":  # every candidate ties: all 32 bits resolved, the lowest blocks win
        return torch.full((B, W), 0.25)
    if name == "two-levels":  # the boundary falls inside a big tie
        return (u > 0.7).float()
    if name == "signed-zeros":  # -0.0 and +0.0 are one key; a few negatives below, positives above
        s = torch.where(u < 0.5, -0.0, 0.0)
        return torch.where(u > 0.97, 1.0, torch.where(u < 0.02, -1.0, s))
    if name == "infinities":  # +inf above everything, -inf below every number
        return torch.where(u > 0.95, math.inf, torch.where(u < 0.5, -math.inf, u))
    if name == "last-bit":  # keys equal but for the lowest mantissa bits: the last pass decides
        base = torch.tensor(0.3).view(torch.int32)
        return (base + torch.randint(0, 4, (B, W), generator=g, dtype=torch.int32)).view(torch.float32)
    if name == "negative-subnormal":  # negative keys (bits flipped) and subnormals next to zero
        tiny = torch.randint(-3, 4, (B, W), generator=g, dtype=torch.int32).float() * 1e-45
        return torch.where(u < 0.5, -u, tiny)
    if name == "any-bits":  # keys over the whole 32-bit range (every exponent, both signs)
        return _bits_as_float(torch.randint(-(1 << 31), 1 << 31, (B, W), generator=g, dtype=torch.int64).int())
    raise ValueError(name)


PATTERNS = ["random", "all-equal", "two-levels", "signed-zeros", "infinities", "last-bit", "negative-subnormal",
            "any-bits"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_both_signals(pattern, backend):
    """Both signals of the same pattern (different draws), ragged lengths, one row that fits the budget."""
    g = torch.Generator().manual_seed(1)
    seq_lens = torch.tensor([410, 233, 40], dtype=torch.int32)
    s_draft, s_target = _patterns(pattern, 3, 405, g), _patterns(pattern, 3, 405, g)
    _run_and_compare(s_draft, s_target, seq_lens, backend, budget=48, m=13, sink=4, recent=16, window=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["draft", "target"])
@pytest.mark.parametrize("pattern", ["two-levels", "last-bit", "any-bits"])
def test_patterns_one_signal(pattern, who, backend):
    """One signal fills the whole free budget."""
    g = torch.Generator().manual_seed(2)
    seq_lens = torch.tensor([300, 180], dtype=torch.int32)
    s = _patterns(pattern, 2, 300, g)
    pair = (s, None) if who == "draft" else (None, s)
    _run_and_compare(*pair, seq_lens, backend, budget=40, m=7, sink=2, recent=3, window=3)


# (id, lens, window, block_size, W, budget, m, sink, recent)
SHAPES = [
    ("W1023", (1023 + 2, 700, 30), 2, 1, 1023, 64, 16, 4, 16),
    ("W37", (37 + 5, 30, 6), 5, 1, 37, 24, 5, 2, 3),
    ("one-left-out", (61 + 1, 50), 1, 1, 61, 60, 20, 4, 16),  # n = budget + 1: one candidate not taken
    ("m0", (300, 260), 4, 1, 296, 40, 0, 4, 16),  # the draft takes nothing
    ("m-free", (300, 260), 4, 1, 296, 40, 20, 4, 16),  # the draft takes the whole free budget
    ("sink0-recent0", (200, 90), 1, 1, 199, 30, 10, 0, 0),
    ("bs16-ragged", (16 * 77 + 3, 16 * 40, 16 * 9 - 5), 3, 16, 77, 24, 6, 2, 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["random", "two-levels"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_shapes_and_quotas(shape, pattern, backend):
    _, lens, window, bs, W, budget, m, sink, recent = shape
    g = torch.Generator().manual_seed(3)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    B = len(lens)
    s_draft, s_target = _patterns(pattern, B, W, g), _patterns(pattern, B, W, g)
    _run_and_compare(s_draft, s_target, seq_lens, backend, budget=budget, m=m, sink=sink, recent=recent,
                     window=window, block_size=bs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("who", ["draft", "target", "both"])
@pytest.mark.parametrize("pattern", ["random", "two-levels", "last-bit"])
def test_topk_invariants(pattern, who, backend):
    """Whatever the ties (FlashInfer style), for the signal that fills the free budget alone: its picks are
    the quota; their scores are the quota largest candidate scores as a multiset (a gather at the chosen
    blocks); every candidate left scores <= the k-th largest and every one above it is picked. With both
    signals, the same bounds hold for the draft's k-th largest (its picks are not told apart from the
    target's)."""
    g = torch.Generator().manual_seed(4)
    B, W, budget, m, sink, recent, window = 2, 1023, 80, 30, 4, 16, 1
    seq_lens = torch.tensor([W + window, 800], dtype=torch.int32)
    s_draft, s_target = _patterns(pattern, B, W, g), _patterns(pattern, B, W, g)
    if who == "draft":
        s_target = None
    elif who == "target":
        s_draft = None
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=budget, m=m, sink=sink, recent=recent,
                               window=window, backend=backend)
    free = budget - sink - recent
    for b, n in enumerate(_history(seq_lens, window, 1)):
        chosen = set(idx[b, : int(count[b])].tolist())
        assert len(chosen) == budget and set(range(sink)) | set(range(n - recent, n)) <= chosen
        cand = range(sink, n - recent)
        row = (s_draft if s_draft is not None else s_target)[b].tolist()
        quota = min(m, free) if who == "both" else free
        ranked = sorted((row[j] for j in cand), reverse=True)
        kth = ranked[quota - 1]
        assert all(row[j] <= kth for j in cand if j not in chosen)
        assert all(j in chosen for j in cand if row[j] > kth)
        if who != "both":
            assert sorted((row[j] for j in cand if j in chosen), reverse=True) == ranked[:quota]


def test_one_launch_per_call(monkeypatch):
    """The triton path is one kernel launch on grid (B, cdiv(W, CHUNK)) (here 300 columns in chunks of 256 by
    the interpreter's default rule), whatever the signals and the tie path taken."""
    mod = codegen.load(KernelSpec("select_tokens", "interp"))
    launches = []
    kernel = mod.select_tokens

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, "select_tokens", Counted())
    seq_lens = torch.tensor([300, 200, 90], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    for pattern in ("random", "all-equal"):
        s = _patterns(pattern, 3, 300, g)
        for pair in ((s, s.flip(1)), (s, None), (None, s)):
            launches.clear()
            _run_and_compare(*pair, seq_lens, "triton", budget=40, m=9, sink=4, recent=16, window=1)
            assert launches == [(3, 2)]


def test_out_tensors_are_overwritten():
    """out=(idx, count) holding garbage: every slot is written (chosen blocks, then -1 padding)."""
    seq_lens = torch.tensor([250, 30], dtype=torch.int32)
    s = torch.rand(2, 250)
    idx = torch.full((2, 40), 12345, dtype=torch.int32)
    count = torch.full((2,), -7, dtype=torch.int32)
    got = select_tokens(s, s.flip(1), seq_lens, budget=40, m=10, window=1, backend="triton", out=(idx, count))
    assert got[0] is idx and got[1] is count
    want_idx, want_count = ref.select_tokens(s, s.flip(1), seq_lens, 40, 10, 4, 16, 1)
    assert idx.long().tolist() == want_idx.tolist() and count.long().tolist() == want_count.tolist()


@pytest.mark.parametrize("config", [{"CHUNK": 256, "TILE": 32, "RADIX_BITS": 4},
                                    {"CHUNK": 1024, "TILE": 512, "RADIX_BITS": 8}],
                         ids=lambda c: f"chunk{c['CHUNK']}-tile{c['TILE']}-radix{c['RADIX_BITS']}")
def test_tie_path_at_tile_boundaries(config):
    """The draft's equal-key rank and the target's running rank cross tile boundaries: ties spread over
    every tile, the needed-th equal block falling in a later tile than the first equal one."""
    W = 600
    seq_lens = torch.tensor([W + 2], dtype=torch.int32)
    s_draft = torch.zeros(1, W)
    s_draft[0, 100::7] = 1.0  # 72 blocks above, the rest tie at 0.0
    s_target = torch.zeros(1, W)
    s_target[0, 300::50] = 2.0
    with dispatch.override({**config, "num_warps": 4, "num_stages": 1}, kernel="select_tokens"):
        _run_and_compare(s_draft, s_target, seq_lens, "triton", budget=200, m=90, sink=3, recent=5, window=2)
