"""select_tokens: both backends equal ref.select_tokens exactly (the rule, ties included, is deterministic),
and the input checks. Top-k invariants that hold whatever the ties (FlashInfer style) and inputs aimed at
the triton kernel's radix select: test_select_tokens_radix.py."""
import math

import pytest
import torch

from dustin_kernels import dispatch, ref, select_tokens

BACKENDS = ["torch", "triton"]


def _history(seq_lens, window, block_size):
    return [math.ceil((L - window) / block_size) for L in seq_lens.tolist()]


def _scores(B, W, dtype=torch.float32, levels=None):
    """Random [B, W] scores; `levels` quantises them to that many values (exact ties)."""
    s = torch.rand(B, W)
    if levels is not None:
        s = (s * levels).floor()
    return s.to(dtype)


def _check(s_draft, s_target, seq_lens, backend, *, budget, m, sink=4, recent=16, window, block_size=1):
    """Run the op, check the output format, compare with the reference exactly; returns (idx, count)."""
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=budget, m=m, sink=sink, recent=recent,
                               window=window, block_size=block_size, backend=backend)
    B = seq_lens.shape[0]
    assert idx.dtype == torch.int32 and count.dtype == torch.int32
    assert idx.shape == (B, budget) and count.shape == (B,)
    for b, n in enumerate(_history(seq_lens, window, block_size)):
        c = int(count[b])
        assert c == min(n, budget)
        row = idx[b].tolist()
        assert row[c:] == [-1] * (budget - c)  # -1 padded
        assert all(0 <= j < n for j in row[:c]) and row[:c] == sorted(set(row[:c]))  # distinct, ascending
    ref_idx, ref_count = ref.select_tokens(s_draft, s_target, seq_lens, budget, m, sink, recent, window,
                                           block_size)
    torch.testing.assert_close(idx.long(), ref_idx, rtol=0, atol=0)
    torch.testing.assert_close(count.long(), ref_count, rtol=0, atol=0)
    return idx, count


# (id, B, lens, window, block_size, budget, m, sink, recent, scores: dtype / levels / which are None)
CASES = [
    ("fp32-ragged-bs1-random", 3, (301, 40, 254), 5, 1, 48, 12, 4, 16, {}),
    ("fp32-ragged-bs16-random", 3, (1601, 339, 1000), 4, 16, 24, 6, 2, 3, {}),
    ("fp32-bs1-ties3", 3, (290, 300, 64), 5, 1, 48, 12, 4, 16, {"levels": 3}),
    ("fp32-bs1-all-equal", 2, (290, 300), 5, 1, 48, 12, 4, 16, {"levels": 1}),
    ("fp32-bs16-all-equal", 2, (2000, 777), 1, 16, 40, 20, 4, 16, {"levels": 1}),
    ("fp32-budget-holds-all", 3, (100, 37, 5), 5, 1, 128, 12, 4, 16, {}),
    ("fp32-budget-tiny", 2, (400, 250), 5, 1, 22, 1, 4, 16, {}),
    ("fp32-budget-is-forced", 2, (400, 250), 5, 1, 20, 3, 4, 16, {}),
    ("fp32-m0", 2, (300, 200), 1, 1, 48, 0, 4, 16, {"levels": 4}),
    ("fp32-m-over-free", 2, (300, 200), 1, 1, 48, 48, 4, 16, {"levels": 4}),
    ("fp32-no-target", 2, (300, 200), 5, 1, 48, 3, 4, 16, {"target": None}),
    ("fp32-no-draft", 2, (300, 200), 5, 1, 48, 30, 4, 16, {"draft": None, "levels": 5}),
    ("fp32-sink0-recent0", 2, (300, 200), 5, 1, 40, 13, 0, 0, {}),
    ("fp16-bs1-random", 2, (300, 180), 5, 1, 48, 12, 4, 16, {"dtype": torch.float16}),
    ("bf16-bs16-random", 2, (3000, 1500), 5, 16, 48, 12, 4, 16, {"dtype": torch.bfloat16}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(case, backend):
    _, B, lens, window, bs, budget, m, sink, recent, opts = case
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    W = max(_history(seq_lens, window, bs)) + 3  # wider than any history: columns past it are ignored
    s_draft = _scores(B, W, opts.get("dtype", torch.float32), opts.get("levels"))
    s_target = _scores(B, W, opts.get("dtype", torch.float32), opts.get("levels"))
    s_draft, s_target = opts.get("draft", s_draft), opts.get("target", s_target)
    _check(s_draft, s_target, seq_lens, backend, budget=budget, m=m, sink=sink, recent=recent, window=window,
           block_size=bs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_history_walks_many_tiles(backend):
    """5000 history blocks, budget 64: the triton path walks many tiles in each radix pass."""
    s_draft, s_target = _scores(1, 5000), _scores(1, 5000, levels=50)
    _check(s_draft, s_target, torch.tensor([5004], dtype=torch.int32), backend, budget=64, m=16, window=4)


@pytest.mark.parametrize("config", [
    {"CHUNK": 256, "TILE": 32, "RADIX_BITS": 8},  # many tiles per pass, 4 passes, 3 chunks
    {"CHUNK": 1024, "TILE": 1024, "RADIX_BITS": 5},  # one chunk, one tile per pass, 7 passes (the last of 2 bits)
    {"CHUNK": 128, "TILE": 64, "RADIX_BITS": 7},  # 5 passes (the last of 4 bits), 6 chunks of 2 tiles
    {"CHUNK": 240, "TILE": 16, "RADIX_BITS": 4},  # 8 passes, tiles narrower than the budget, a chunk not a power of 2
], ids=lambda c: f"chunk{c['CHUNK']}-tile{c['TILE']}-radix{c['RADIX_BITS']}")
def test_triton_tilings(config):
    """Tile widths and digit widths of the radix select: every pass split and tile walk gives the same set."""
    seq_lens = torch.tensor([700, 520, 90], dtype=torch.int32)
    s_draft, s_target = _scores(3, 700, levels=6), _scores(3, 700)
    with dispatch.override({**config, "num_warps": 4, "num_stages": 1}, kernel="select_tokens"):
        _check(s_draft, s_target, seq_lens, "triton", budget=64, m=16, window=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_scores_of_different_widths(backend):
    seq_lens = torch.tensor([203, 150], dtype=torch.int32)
    s_draft = _scores(260, 2, levels=9).t()  # [2, 260] column-major view
    s_target = _scores(2, 400)[:, ::2]  # [2, 200], column stride 2
    _check(s_draft, s_target, seq_lens, backend, budget=40, m=8, window=3)


def test_score_widths_share_one_compiled_kernel(monkeypatch):
    """Score rows of 4096 and 4100 columns (caches of any length) at one launch config give the same JIT
    specialisation key: no recompile when the context grows. The interpreter does not compile, so the key
    is computed by Triton's own binder from the recorded launch arguments."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from dustin_kernels import codegen
    from dustin_kernels.spec import KernelSpec

    mod = codegen.load(KernelSpec("select_tokens", "interp"))
    keys = {}

    def recorded(name, width):
        kernel = getattr(mod, name)
        jit = JITFunction(kernel.fn, **kernel.kwargs)
        binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)

        def launch(grid):
            def run(*args, **kwargs):
                keys.setdefault(name, {})[width] = str(binder(*args, **kwargs)[1])
                return kernel[grid](*args, **kwargs)
            return run
        return type("Recorded", (), {"__getitem__": lambda self, grid: launch(grid)})()

    seq_lens = torch.tensor([300, 200], dtype=torch.int32)
    config = {"CHUNK": 2048, "TILE": 256, "RADIX_BITS": 8, "num_warps": 4, "num_stages": 1}  # one config: the key
    for width in (4096, 4100):
        with monkeypatch.context() as patch, dispatch.override(config, kernel="select_tokens"):
            patch.setattr(mod, "select_tokens", recorded("select_tokens", width))
            _check(_scores(2, width), _scores(2, width), seq_lens, "triton", budget=40, m=10, window=5)
    assert set(keys["select_tokens"]) == {4096, 4100}
    assert keys["select_tokens"][4096] == keys["select_tokens"][4100]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_seq_lens(backend):
    """seq_lens as a strided view: the kernels must read seq_lens[b], not the b-th element of its storage."""
    seq_lens = torch.tensor([300, 7, 120, 9], dtype=torch.int32)[::2]
    _check(_scores(2, 300), _scores(2, 300), seq_lens, backend, budget=40, m=10, window=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_signed_zero_ties(backend):
    """-0.0 and +0.0 compare equal: the lower block wins, as in the reference."""
    s = torch.zeros(1, 200)
    s[0, ::3] = -0.0
    s[0, 50:60] = -1.0
    _check(s, s.clone(), torch.tensor([201], dtype=torch.int32), backend, budget=40, m=10, window=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_rank_lowest(backend, dtype):
    """NaN ranks below every number, -inf included (ties among NaN: the lower block); the target must take
    some NaN blocks here, the draft none."""
    seq_lens = torch.tensor([66, 50], dtype=torch.int32)
    s_draft, s_target = _scores(2, 64, dtype), _scores(2, 64, dtype)
    s_draft[:, ::3] = math.nan
    s_target[:, 5:55] = math.nan
    s_target[:, 60] = -math.inf
    s_draft[0, 7] = -math.inf
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=32, m=6, sink=2, recent=2, window=2,
                               backend=backend)
    # the reference ranks a NaN as -inf; -inf scores sit where they tie with no NaN
    lowest = torch.finfo(torch.float32).min
    expected = ref.select_tokens(*(torch.nan_to_num(s.float(), nan=-math.inf, neginf=lowest)
                                   for s in (s_draft, s_target)), seq_lens, 32, 6, 2, 2, 2)
    assert idx.tolist() == expected[0].tolist() and count.tolist() == expected[1].tolist()
    assert {5, 60} <= set(idx[0].tolist()) and 54 not in idx[0].tolist()  # -inf before NaN, low NaN first


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_empty_history(backend):
    empty = torch.zeros(0, 8)
    idx, count = select_tokens(empty, None, torch.zeros(0, dtype=torch.int32), budget=24, m=4, window=1,
                               backend=backend)
    assert idx.shape == (0, 24) and count.shape == (0,) and idx.dtype == count.dtype == torch.int32
    _check(torch.rand(2, 3), torch.rand(2, 3), torch.tensor([5, 8], dtype=torch.int32), backend, budget=20,
           m=2, window=5)


def _bad_cases():
    B, W = 2, 40
    good = dict(s_draft=torch.rand(B, W), s_target=torch.rand(B, W), seq_lens=torch.tensor([30, 45], dtype=torch.int32),
                budget=24, m=4, sink=4, recent=16, window=5, block_size=1)
    cases = [
        ("budget", {"budget": 19}, ValueError),  # < sink + recent
        ("budget", {"budget": 0, "sink": 0, "recent": 0, "m": 0}, ValueError),
        ("budget", {"budget": 24.0}, TypeError),
        ("m", {"m": 25}, ValueError),
        ("m", {"m": -1}, ValueError),
        ("sink", {"sink": -1}, ValueError),
        ("recent", {"recent": -2}, ValueError),
        ("window", {"window": 0}, ValueError),
        ("block_size", {"block_size": 3}, ValueError),
        ("s_draft", {"s_draft": None, "s_target": None}, ValueError),
        ("s_draft", {"s_draft": torch.rand(B, 1, W)}, ValueError),
        ("s_draft", {"s_draft": torch.rand(B, W).double()}, TypeError),
        ("s_draft", {"s_draft": torch.ones(B, W, dtype=torch.int32)}, TypeError),
        ("s_draft", {"s_draft": [[0.0] * W] * B}, TypeError),
        ("s_draft", {"s_draft": torch.rand(B, 39)}, ValueError),  # 40 history blocks
        ("s_target", {"s_target": torch.rand(B, 39)}, ValueError),
        ("s_target", {"s_draft": None, "s_target": torch.rand(B, 10)}, ValueError),
        ("s_target", {"s_target": torch.rand(B + 1, W)}, ValueError),
        ("seq_lens", {"seq_lens": torch.tensor([30, 4], dtype=torch.int32)}, ValueError),  # shorter than window
        ("seq_lens", {"seq_lens": torch.tensor([30, 45])}, TypeError),  # int64
        ("seq_lens", {"seq_lens": torch.tensor([30], dtype=torch.int32)}, ValueError),
        ("seq_lens", {"seq_lens": torch.tensor([30, 45], dtype=torch.int32, device="meta")}, ValueError),
        ("s_target", {"s_target": torch.rand(B, W, device="meta")}, ValueError),
        ("backend", {"backend": "cuda"}, ValueError),
    ]
    return [pytest.param(good | change, err, name, id=f"{name}-{i}") for i, (name, change, err) in enumerate(cases)]


@pytest.mark.parametrize("kwargs, error, name", _bad_cases())
def test_bad_inputs_name_the_argument(kwargs, error, name):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=name):
        select_tokens(kwargs.pop("s_draft"), kwargs.pop("s_target"), kwargs.pop("seq_lens"), **kwargs)
