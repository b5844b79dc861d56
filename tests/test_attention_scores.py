"""attention_scores (the README's first op): both backends against the float64 reference.

Every output is also checked for two invariants: each query row's probabilities sum to 1 (so a
sequence sums to len(heads) * T) and blocks past seq_lens are exactly zero. The math is fp32 on the
rounded inputs whatever their dtype, so outputs are held to the fp32 tolerance.
"""
import math

import pytest
import torch
from conftest import TOLERANCES

from dustin_kernels import attention_scores, dispatch, ref
from dustin_kernels.ops import scores
from dustin_kernels.spec import KernelSpec, Launch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LENGTHS = {"short": ((27, 113, 61), 120), "long": ((300, 181), 320)}  # ragged, not multiples of a block
ATOL, RTOL = TOLERANCES[torch.float32]


def _heads(kind: str, n_q_heads: int, group: int):
    """all: None; subset: heads on both KV heads, unsorted; uneven: 3 heads of KV head 1, 1 of KV head 0."""
    if kind == "all":
        return None
    if kind == "subset":
        return list(dict.fromkeys([n_q_heads - 1, 0, n_q_heads // 2, 1]))
    return [group + 1, 0, 2 * group - 1, group + 2]


def _problem(dtype, head_dim, group, window, lengths="short", kv_heads=2):
    lens, n_max = LENGTHS[lengths]
    q = torch.randn(len(lens), group * kv_heads, window, head_dim).to(DTYPES[dtype])
    k = torch.randn(len(lens), kv_heads, n_max, head_dim).to(DTYPES[dtype])
    return q, k, torch.tensor(lens, dtype=torch.int32)


def _check(out, q, k, seq_lens, heads, block_size, scale=None):
    B, Hq, T, _ = q.shape
    assert out.dtype == torch.float32 and out.shape == (B, math.ceil(k.shape[2] / block_size))
    expected = ref.attention_scores(q, k, seq_lens, heads, block_size, scale)
    torch.testing.assert_close(out.double().cpu(), expected, atol=ATOL, rtol=RTOL)
    n_heads = Hq if heads is None else len(heads)
    totals = torch.full((B,), float(n_heads * T), dtype=torch.float64)
    torch.testing.assert_close(out.double().sum(1).cpu(), totals, atol=ATOL, rtol=RTOL)
    for b, length in enumerate(seq_lens.tolist()):
        assert not out[b, math.ceil(length / block_size):].any()


@pytest.mark.parametrize("heads", ["all", "subset"])
@pytest.mark.parametrize("block_size", [1, 16], ids=lambda v: f"bs{v}")
@pytest.mark.parametrize("window", [1, 5], ids=lambda v: f"T{v}")
@pytest.mark.parametrize("group", [1, 4, 8], ids=lambda v: f"G{v}")
@pytest.mark.parametrize("head_dim", [64, 80, 128], ids=lambda v: f"D{v}")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_torch_matches_reference(dtype, head_dim, group, window, block_size, heads):
    q, k, seq_lens = _problem(dtype, head_dim, group, window)
    heads = _heads(heads, q.shape[1], group)
    out = attention_scores(q, k, seq_lens, heads=heads, block_size=block_size, backend="torch")
    _check(out, q, k, seq_lens, heads, block_size)


TRITON_CASES = [  # pairwise over dtype, D, G, T, block size, heads, lengths, ONE_PASS (the interpreter is slow)
    ("fp32", 64, 1, 1, 1, "all", "short", 0),
    ("fp16", 80, 4, 5, 16, "subset", "long", 1),
    ("bf16", 128, 8, 5, 1, "subset", "short", 1),
    ("bf16", 64, 4, 1, 16, "all", "long", 0),
    ("fp32", 80, 8, 1, 16, "all", "short", 1),
    ("fp16", 128, 1, 5, 1, "all", "long", 1),
    ("fp32", 128, 4, 5, 16, "uneven", "short", 1),
    ("bf16", 80, 1, 16, 1, "all", "short", 0),
    ("fp16", 64, 8, 5, 128, "all", "long", 1),
    ("bf16", 64, 8, 5, 16, "uneven", "long", 1),
]


@pytest.mark.parametrize("dtype, head_dim, group, window, block_size, heads, lengths, one_pass", TRITON_CASES,
                         ids=[f"{c[0]}-D{c[1]}-G{c[2]}-T{c[3]}-bs{c[4]}-{c[5]}-{c[6]}-onepass{c[7]}"
                              for c in TRITON_CASES])
def test_triton_matches_reference(dtype, head_dim, group, window, block_size, heads, lengths, one_pass):
    q, k, seq_lens = _problem(dtype, head_dim, group, window, lengths)
    heads = _heads(heads, q.shape[1], group)
    spec = KernelSpec("attention_scores", "interp", dtype, head_dim, group, window, block_size)
    config = scores.default_config(Launch(spec, len(seq_lens), k.shape[2]))
    # ONE_PASS sums whole blocks per row_lse tile: LSE_BLOCK_N a multiple of the block size
    config |= {"ONE_PASS": one_pass, "LSE_BLOCK_N": max(config["LSE_BLOCK_N"], block_size)}
    with dispatch.override(config, kernel="attention_scores"):
        out = attention_scores(q, k, seq_lens, heads=heads, block_size=block_size, backend="triton")
    _check(out, q, k, seq_lens, heads, block_size)


# the interpreter also evaluates exp2 on lanes that tl.where then discards: numpy warns of their inf
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("one_pass", [0, 1], ids=lambda v: f"onepass{v}")
def test_rows_whose_scores_are_all_very_negative(one_pass):
    """Every visible key of a row scores below -88 (natural log): exp2 of -lse overflows in fp32, and
    ONE_PASS must still give exact zeros past seq_len and the reference elsewhere (no 0 * inf)."""
    g = torch.Generator().manual_seed(0)
    q = -4 * torch.ones(2, 4, 2, 64)
    k = 4 * torch.ones(2, 2, 112, 64) + 0.1 * torch.randn(2, 2, 112, 64, generator=g)
    seq_lens = torch.tensor([65, 100], dtype=torch.int32)
    config = {"LSE_BLOCK_N": 32, "NUM_SPLITS": 2, "lse_num_warps": 4, "lse_num_stages": 1, "BLOCK_N": 64,
              "num_warps": 4, "num_stages": 1, "ONE_PASS": one_pass}
    with dispatch.override(config, kernel="attention_scores"):
        out = attention_scores(q, k, seq_lens, heads=[0, 3], block_size=16, backend="triton")
    assert torch.isfinite(out).all()
    _check(out, q, k, seq_lens, [0, 3], 16)


def test_one_pass_needs_whole_blocks_per_row_lse_tile():
    q, k, seq_lens = _problem("fp32", 64, 1, 1)
    config = {"LSE_BLOCK_N": 16, "NUM_SPLITS": 1, "lse_num_warps": 4, "lse_num_stages": 1, "BLOCK_N": 32,
              "num_warps": 4, "num_stages": 1, "ONE_PASS": 1}
    with dispatch.override(config, kernel="attention_scores"), pytest.raises(ValueError, match="LSE_BLOCK_N=16"):
        attention_scores(q, k, seq_lens, block_size=32, backend="triton")


@pytest.mark.parametrize("one_pass", [0, 1], ids=lambda v: f"onepass{v}")
@pytest.mark.parametrize("config", [
    {"LSE_BLOCK_N": 16, "NUM_SPLITS": 8, "BLOCK_N": 16},  # more splits than tiles: empty splits
    {"LSE_BLOCK_N": 64, "NUM_SPLITS": 1, "BLOCK_N": 128},
    {"LSE_BLOCK_N": 128, "NUM_SPLITS": 2, "BLOCK_N": 32},  # block_scores tiles inside one row_lse tile
], ids=["splits8-tiles16", "splits1-tiles128", "lse128-tiles32"])
def test_triton_launch_configs(config, one_pass):
    q, k, seq_lens = _problem("fp32", 64, 4, 5)
    heads = _heads("uneven", q.shape[1], 4)
    config = {**config, "lse_num_warps": 4, "lse_num_stages": 1, "num_warps": 4, "num_stages": 1,
              "ONE_PASS": one_pass}
    with dispatch.override(config, kernel="attention_scores"):
        out = attention_scores(q, k, seq_lens, heads=heads, block_size=16, backend="triton")
    _check(out, q, k, seq_lens, heads, 16)


@pytest.mark.parametrize("arch, one_pass", [("sm80", 0), ("sm90", 0), ("sm90", 1)])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # the interpreter computes bf16 wrongly without upcasts
def test_gpu_flavours_in_interpreter(arch, one_pass, dtype, monkeypatch):
    """The sm80 / sm90 renderings (their own dot orientation, D chunks, tf32x3) run in the interpreter."""
    monkeypatch.setattr(dispatch, "arch_for", lambda device: arch)
    q, k, seq_lens = _problem(dtype, 80, 4, 5, "long")
    heads = _heads("uneven", q.shape[1], 4)
    config = {"LSE_BLOCK_N": 32, "NUM_SPLITS": 2, "lse_num_warps": 4, "lse_num_stages": 1,
              "BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "ONE_PASS": one_pass}
    with dispatch.override(config, kernel="attention_scores"):
        out = attention_scores(q, k, seq_lens, heads=heads, block_size=16, backend="triton")
    _check(out, q, k, seq_lens, heads, 16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_and_scale(backend):
    """q [B, T, Hq, D] transposed, keys [B, N, Hkv, D] sliced and transposed, a strided seq_lens, and a
    large scale (peaked softmax)."""
    B, Hq, Hkv, T, D, N = 2, 8, 2, 5, 64, 120
    q = torch.randn(B, T, Hq, D, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(B, N + 9, Hkv, D, dtype=torch.float16)[:, 4:4 + N].transpose(1, 2)
    seq_lens = torch.tensor([113, 0, 27, 0], dtype=torch.int32)[::2]
    heads = [6, 1, 3]
    out = attention_scores(q, k, seq_lens, heads=heads, block_size=16, scale=0.5, backend=backend)
    _check(out, q, k, seq_lens, heads, 16, scale=0.5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_dim_not_contiguous(backend):
    q, _, seq_lens = _problem("fp32", 64, 4, 1)
    k = torch.randn(3, 2, 64, 120).transpose(-1, -2)  # stride 1 along keys, not along D
    out = attention_scores(q, k, seq_lens, heads=[7, 2], block_size=1, backend=backend)
    _check(out, q, k, seq_lens, [7, 2], 1)


def test_torch_backend_key_chunks(monkeypatch):
    monkeypatch.setattr(scores, "_TORCH_CHUNK_ELEMENTS", 1)  # 128-key chunks
    q, k, seq_lens = _problem("bf16", 64, 4, 5, "long")
    out = attention_scores(q, k, seq_lens, heads=[5, 0, 7], block_size=16, backend="torch")
    _check(out, q, k, seq_lens, [5, 0, 7], 16)


def test_torch_backend_128k_context():
    B, Hq, Hkv, T, D, N = 2, 2, 1, 2, 64, 131_072 + 37
    q = torch.randn(B, Hq, T, D, dtype=torch.float16)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float16)
    seq_lens = torch.tensor([131_072, 70_001], dtype=torch.int32)
    out = attention_scores(q, k, seq_lens, block_size=16, backend="torch")
    _check(out, q, k, seq_lens, None, 16)


def test_empty_batch():
    q, k = torch.randn(0, 4, 2, 64), torch.randn(0, 2, 50, 64)
    out = attention_scores(q, k, torch.zeros(0, dtype=torch.int32), block_size=16)
    assert out.shape == (0, 4) and out.dtype == torch.float32


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("block_size", [1, 16, 128], ids=lambda v: f"bs{v}")
def test_default_config_rule(arch, dtype, block_size):
    spec = KernelSpec("attention_scores", arch, dtype, 128, 8, 16, block_size)
    for batch in (1, 16, 64):
        for context in (100, 32_768, 131_072):
            config = scores.default_config(Launch(spec, batch, context))
            splits = config["NUM_SPLITS"]
            assert 1 <= splits <= 16 and splits & (splits - 1) == 0
            assert config["BLOCK_N"] % block_size == 0 and min(config["BLOCK_N"], config["LSE_BLOCK_N"]) >= 16


def test_aot_signatures_name_every_argument():
    spec = KernelSpec("attention_scores", "sm90", "bf16", 128, 4, 5, 16)
    config = scores.default_config(Launch(spec, 16, 32_768))
    for kernel in scores.aot_kernels(spec, config):
        assert list(kernel.signature) == list(kernel.fn.arg_names)
        assert {a for a, t in kernel.signature.items() if t == "constexpr"} == set(kernel.constexprs)


def _valid():
    return {"q": torch.randn(2, 4, 3, 16), "k_cache": torch.randn(2, 2, 20, 16),
            "seq_lens": torch.tensor([10, 20], dtype=torch.int32)}


BAD_INPUTS = {
    "q-rank": ({"q": torch.randn(4, 3, 16)}, {}, ValueError, "^q:"),
    "k-rank": ({"k_cache": torch.randn(2, 20, 16)}, {}, ValueError, "^k_cache:"),
    "q-int": ({"q": torch.ones(2, 4, 3, 16, dtype=torch.int32)}, {}, TypeError, "^q:"),
    "q-not-tensor": ({"q": [[1.0]]}, {}, TypeError, "^q:"),
    "q-no-heads": ({"q": torch.randn(2, 0, 3, 16)}, {}, ValueError, "^q:"),
    "q-head-dim-0": ({"q": torch.randn(2, 4, 3, 0), "k_cache": torch.randn(2, 2, 20, 0)}, {}, ValueError, "^q:"),
    "heads-not-multiple": ({"q": torch.randn(2, 3, 3, 16)}, {}, ValueError, "^q:.*multiple"),
    "k-batch": ({"k_cache": torch.randn(1, 2, 20, 16)}, {}, ValueError, "^k_cache:"),
    "k-head-dim": ({"k_cache": torch.randn(2, 2, 20, 8)}, {}, ValueError, "^k_cache:"),
    "dtype-mismatch": ({"k_cache": torch.randn(2, 2, 20, 16, dtype=torch.float16)}, {}, TypeError, "^k_cache:"),
    "seq_lens-beyond-cache": ({"seq_lens": torch.tensor([10, 21], dtype=torch.int32)}, {}, ValueError, "^seq_lens:"),
    "seq_lens-short-of-window": ({"seq_lens": torch.tensor([2, 20], dtype=torch.int32)}, {}, ValueError,
                                 "^seq_lens:"),
    "seq_lens-int64": ({"seq_lens": torch.tensor([10, 20])}, {}, TypeError, "^seq_lens:"),
    "seq_lens-shape": ({"seq_lens": torch.tensor([10], dtype=torch.int32)}, {}, ValueError, "^seq_lens:"),
    "seq_lens-list": ({"seq_lens": [10, 20]}, {}, TypeError, "^seq_lens:"),
    "block_size-3": ({}, {"block_size": 3}, ValueError, "^block_size:"),
    "block_size-0": ({}, {"block_size": 0}, ValueError, "^block_size:"),
    "block_size-256": ({}, {"block_size": 256}, ValueError, "^block_size:"),
    "block_size-float": ({}, {"block_size": 16.0}, ValueError, "^block_size:"),
    "heads-out-of-range": ({}, {"heads": [0, 4]}, ValueError, "^heads:"),
    "heads-negative": ({}, {"heads": [-1]}, ValueError, "^heads:"),
    "heads-duplicate": ({}, {"heads": [1, 2, 1]}, ValueError, "^heads:"),
    "heads-float": ({}, {"heads": [1.5]}, TypeError, "^heads:"),
    "heads-bool": ({}, {"heads": [True]}, TypeError, "^heads:"),
    "heads-int": ({}, {"heads": 2}, TypeError, "^heads:"),
    "heads-tensor": ({}, {"heads": torch.tensor([0, 1])}, TypeError, "^heads:"),
    "scale-negative": ({}, {"scale": -1.0}, ValueError, "^scale:"),
    "scale-inf": ({}, {"scale": float("inf")}, ValueError, "^scale:"),
    "backend-unknown": ({}, {"backend": "cuda"}, ValueError, "^backend:"),
}


@pytest.mark.parametrize("inputs, kwargs, error, match", BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_bad_inputs(inputs, kwargs, error, match):
    args = {**_valid(), **inputs}
    with pytest.raises(error, match=match):
        attention_scores(args["q"], args["k_cache"], args["seq_lens"], **kwargs)
