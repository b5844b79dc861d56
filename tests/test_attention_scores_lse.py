"""attention_scores with a given log-sum-exp (lse=) and attention_scores_layers (several layers, one launch):
both backends against the float64 reference.

The lse passed in is the float64 reference's (`ref.attention_lse`, rounded to float32) or the one
`dense_verify(return_lse=True)` returns, from the same q and k. Outputs are checked like
tests/test_attention_scores.py: against `ref.attention_scores` (summed over layers), each sequence
summing to (selected heads x T) over the layers, and zeros past seq_lens.
"""
import math

import pytest
import torch
from conftest import TOLERANCES

from dustin_kernels import dense_verify, dispatch, perf_db, ref
from dustin_kernels.ops import scores
from dustin_kernels.ops.scores import attention_scores, attention_scores_layers
from dustin_kernels.spec import KernelSpec, Launch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LENGTHS = {"short": ((27, 113, 61), 120), "long": ((300, 181), 320)}  # ragged, not multiples of a block
ATOL, RTOL = TOLERANCES[torch.float32]
BACKENDS = ["torch", "triton"]


def _layers(dtype, head_dim, group, window, n_layers, lengths="short", kv_heads=2, stale=True):
    """Per layer q, k and lse (float64 reference, as float32), one seq_lens; cache slots past each
    sequence's length hold NaN (stale=True): they must not leak into any result."""
    lens, n_max = LENGTHS[lengths]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qs, ks, lses = [], [], []
    for _ in range(n_layers):
        q = torch.randn(len(lens), group * kv_heads, window, head_dim).to(DTYPES[dtype])
        k = torch.randn(len(lens), kv_heads, n_max, head_dim).to(DTYPES[dtype])
        lses.append(ref.attention_lse(q, k, seq_lens).float())
        if stale:
            for b, length in enumerate(lens):
                k[b, :, length:] = float("nan")
        qs.append(q)
        ks.append(k)
    return qs, ks, seq_lens, lses


def _check(out, qs, ks, seq_lens, heads, block_size, scale=None):
    B, Hq, T, _ = qs[0].shape
    assert out.dtype == torch.float32 and out.shape == (B, math.ceil(ks[0].shape[2] / block_size))
    expected = sum(ref.attention_scores(q, k, seq_lens, h, block_size, scale) for q, k, h in zip(qs, ks, heads))
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    n_rows = sum((Hq if h is None else len(h)) * T for h in heads)
    torch.testing.assert_close(out.double().sum(1), torch.full((B,), float(n_rows), dtype=torch.float64),
                               atol=ATOL, rtol=RTOL)
    for b, length in enumerate(seq_lens.tolist()):
        assert not out[b, math.ceil(length / block_size):].any()


CASES = [  # dtype, D, G, T, block size, lengths, heads per layer (q-head lists; G * 2 q-heads)
    ("fp32", 64, 1, 1, 1, "short", [[0, 1]]),
    ("bf16", 64, 7, 5, 1, "short", [[0, 3, 7, 10], [1, 2, 8, 13], [4, 5, 6, 11]]),  # the 0.5B draft: 3 x 4 heads
    ("fp16", 80, 4, 5, 16, "long", [[5, 0, 7], [2], [6, 4, 1, 3]]),  # 2 / 1 / 2 used KV heads: padding rows
    ("fp32", 128, 8, 5, 16, "short", [[15, 9], [0, 1, 2, 3, 4, 5, 6, 7]]),  # KV head 1 only / 8 heads of KV head 0
    ("bf16", 64, 4, 16, 16, "long", [None, [3]]),
    ("fp16", 64, 2, 5, 128, "short", [[0, 3], [], [1, 2]]),  # a layer without heads adds nothing
]


def _case_id(c):
    return f"{c[0]}-D{c[1]}-G{c[2]}-T{c[3]}-bs{c[4]}-{c[5]}-L{len(c[6])}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, head_dim, group, window, block_size, lengths, heads", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_layers_match_reference(dtype, head_dim, group, window, block_size, lengths, heads, backend):
    qs, ks, seq_lens, lses = _layers(dtype, head_dim, group, window, len(heads), lengths)
    out = attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=block_size, backend=backend)
    _check(out, qs, ks, seq_lens, heads, block_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16], ids=lambda v: f"bs{v}")
@pytest.mark.parametrize("heads", [None, [6, 1, 3], [2]], ids=["all", "spread", "one"])
def test_given_lse_matches_reference(heads, block_size, backend):
    qs, ks, seq_lens, lses = _layers("fp16", 64, 4, 5, 1)
    out = attention_scores(qs[0], ks[0], seq_lens, heads=heads, block_size=block_size, lse=lses[0], backend=backend)
    _check(out, qs, ks, seq_lens, [heads], block_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_from_dense_verify(backend):
    """The lse a model's own attention returns (`dense_verify(return_lse=True)`) is the one to pass, and
    with it the op equals the one that computes the lse itself."""
    qs, ks, seq_lens, _ = _layers("bf16", 64, 4, 5, 2, stale=False)
    lses = [dense_verify(q, k, torch.randn_like(k), seq_lens, return_lse=True, backend=backend)[1]
            for q, k in zip(qs, ks)]
    heads = [[0, 5], [7, 2, 3]]
    out = attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=16, backend=backend)
    _check(out, qs, ks, seq_lens, heads, 16)
    computed = sum(attention_scores(q, k, seq_lens, heads=h, block_size=16, backend=backend)
                   for q, k, h in zip(qs, ks, heads))
    torch.testing.assert_close(out, computed, atol=ATOL, rtol=RTOL)


def test_triton_is_one_launch_of_layer_scores():
    """Three layers: one config lookup, of the layers3 spec (one launch of layer_scores, no row_lse)."""
    qs, ks, seq_lens, lses = _layers("fp32", 64, 2, 5, 3)
    with dispatch.record() as calls:
        attention_scores_layers(qs, ks, seq_lens, heads=[[0], [0, 1], [2]], lses=lses, backend="triton")
    assert [launch.spec.uri() for launch, _ in calls] == ["attention_scores_interp_fp32_d64_g2_t5_bs1_layers3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unselected_heads_of_lse_are_not_read(backend):
    """Only the selected heads' lse rows are read (and checked): NaN elsewhere does not matter."""
    qs, ks, seq_lens, lses = _layers("fp32", 64, 4, 5, 1)
    lse = lses[0].clone()
    lse[:, [0, 2, 4, 5, 7]] = float("nan")
    out = attention_scores(qs[0], ks[0], seq_lens, heads=[6, 1, 3], block_size=16, lse=lse, backend=backend)
    _check(out, qs, ks, seq_lens, [[6, 1, 3]], 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_scale(backend):
    """q [B, T, Hq, D] transposed, keys [B, N, Hkv, D] sliced and transposed, lse [B, T, Hq] transposed,
    layers with different strides, a strided seq_lens and a large scale (peaked softmax)."""
    B, Hq, Hkv, T, D, N = 2, 8, 2, 5, 64, 120
    seq_lens = torch.tensor([113, 0, 27, 0], dtype=torch.int32)[::2]
    qs = [torch.randn(B, T, Hq, D, dtype=torch.float16).transpose(1, 2), torch.randn(B, Hq, T, D, dtype=torch.float16)]
    ks = [torch.randn(B, N + 9, Hkv, D, dtype=torch.float16)[:, 4:4 + N].transpose(1, 2),
          torch.randn(B, Hkv, N, D, dtype=torch.float16)]
    lses = [ref.attention_lse(q, k, seq_lens, 0.5).float().transpose(1, 2).contiguous().transpose(1, 2)
            for q, k in zip(qs, ks)]
    heads = [[6, 1, 3], [0, 7]]
    out = attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=16, scale=0.5, backend=backend)
    _check(out, qs, ks, seq_lens, heads, 16, scale=0.5)


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # the interpreter computes bf16 wrongly without upcasts
def test_gpu_flavours_in_interpreter(arch, dtype, monkeypatch):
    """The sm80 / sm90 renderings of layer_scores (their own dot orientation, D chunks, tf32x3)."""
    monkeypatch.setattr(dispatch, "arch_for", lambda device: arch)
    qs, ks, seq_lens, lses = _layers(dtype, 80, 4, 5, 2, "long")
    heads = [[5, 0, 7, 6], [3]]
    spec = KernelSpec("attention_scores", arch, dtype, 80, 3, 5, 16, "layers2")
    with dispatch.override(scores.default_config(Launch(spec, 2, 320)), kernel="attention_scores"):
        out = attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=16, backend="triton")
    _check(out, qs, ks, seq_lens, heads, 16)


@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_triton_launch_configs(block_n):
    qs, ks, seq_lens, lses = _layers("fp32", 64, 2, 5, 2, "long")
    heads = [[0, 3], [2]]
    spec = KernelSpec("attention_scores", "interp", "fp32", 64, 2, 5, 16, "layers2")
    config = scores.default_config(Launch(spec, 2, 320)) | {"BLOCK_N": block_n}
    with dispatch.override(config, kernel="attention_scores"):
        out = attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=16, backend="triton")
    _check(out, qs, ks, seq_lens, heads, 16)


def test_block_n_needs_whole_blocks():
    qs, ks, seq_lens, lses = _layers("fp32", 64, 1, 1, 1)
    spec = KernelSpec("attention_scores", "interp", "fp32", 64, 1, 1, 32, "layers1")
    config = scores.default_config(Launch(spec, 3, 120)) | {"BLOCK_N": 16}
    with dispatch.override(config, kernel="attention_scores"), pytest.raises(ValueError, match="BLOCK_N=16"):
        attention_scores(qs[0], ks[0], seq_lens, block_size=32, lse=lses[0], backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_heads_and_empty_batch(backend):
    qs, ks, seq_lens, lses = _layers("fp32", 64, 2, 5, 2)
    out = torch.full((3, 120), float("nan"))
    assert attention_scores_layers(qs, ks, seq_lens, heads=[[], []], lses=lses, backend=backend, out=out) is out
    assert not out.any()
    empty = attention_scores_layers([torch.randn(0, 4, 2, 64)], [torch.randn(0, 2, 50, 64)],
                                    torch.zeros(0, dtype=torch.int32), heads=[None], lses=[torch.zeros(0, 4, 2)],
                                    block_size=16, backend=backend)
    assert empty.shape == (0, 4) and empty.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) traces both entry points (one opaque attention_scores_layers op each);
    opcheck checks the op's registration."""
    qs, ks, seq_lens, lses = _layers("fp32", 64, 2, 5, 2, stale=False)
    heads = [[0, 3], [1]]

    def step(qs, ks, seq_lens, lses):
        return (attention_scores_layers(qs, ks, seq_lens, heads=heads, lses=lses, block_size=16, backend=backend),
                attention_scores(qs[0], ks[0], seq_lens, heads=heads[0], lse=lses[0], backend=backend))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(qs, ks, seq_lens, lses)
    for got, want in zip(compiled, step(qs, ks, seq_lens, lses)):
        torch.testing.assert_close(got, want)
    torch.library.opcheck(torch.ops.dustin_kernels.attention_scores_layers.default,
                          (qs, ks, lses, seq_lens, torch.empty(3, 8), [0, 3, 1], [2, 1], 16, 0.125, backend))


def test_default_config_is_within_the_search_space():
    """A layers variant's default config could be stored in the perf DB as it is (all keys, valid values)."""
    for arch in ("sm80", "sm90"):
        for launch in scores.aot_launches(arch):
            config = scores.default_config(launch)
            assert perf_db.config_errors(launch.key(), config) == []
            assert config["BLOCK_N"] % launch.spec.block_size == 0


def test_aot_signatures_name_every_argument():
    spec = KernelSpec("attention_scores", "sm90", "bf16", 64, 2, 5, 1, "layers3")
    (kernel,) = scores.aot_kernels(spec, scores.default_config(Launch(spec, 16, 32_768)))
    assert kernel.fn.__name__ == "layer_scores"
    assert list(kernel.signature) == list(kernel.fn.arg_names)
    assert {a for a, t in kernel.signature.items() if t == "constexpr"} == set(kernel.constexprs)
    assert {a for a, t in kernel.signature.items() if t.startswith("*")} == {
        *(f"{x}{i}_ptr" for i in range(3) for x in ("q", "k", "lse")), "seq_lens_ptr", "table_ptr", "out_ptr"}


def _valid():
    seq_lens = torch.tensor([10, 20], dtype=torch.int32)
    qs = [torch.randn(2, 4, 3, 16) for _ in range(2)]
    ks = [torch.randn(2, 2, 20, 16) for _ in range(2)]
    return {"qs": qs, "k_caches": ks, "seq_lens": seq_lens, "heads": [[0, 3], [1]],
            "lses": [ref.attention_lse(q, k, seq_lens).float() for q, k in zip(qs, ks)]}


def _nan_at(lse, head):
    lse = lse.clone()
    lse[1, head, 2] = float("nan")
    return lse


BAD_LSE = {
    "shape": (lambda v: v[:, :3], ValueError, r"^lse: expected shape \[B=2, Hq=4, T=3\]"),
    "rank": (lambda v: v[None], ValueError, "^lse: expected 3 dims"),
    "dtype": (lambda v: v.half(), TypeError, "^lse: expected dtype in \\(float32\\)"),
    "not-tensor": (lambda v: v.tolist(), TypeError, "^lse: expected a torch.Tensor"),
    "device": (lambda v: v.to("meta"), ValueError, "^lse: expected a tensor on cpu"),
    "nan-on-selected-head": (lambda v: _nan_at(v, 3), ValueError, "^lse: expected finite values"),
    "inf-on-selected-head": (lambda v: v.index_fill(1, torch.tensor([0]), float("inf")), ValueError,
                             "^lse: expected finite values"),
}


@pytest.mark.parametrize("make, error, match", BAD_LSE.values(), ids=list(BAD_LSE))
def test_bad_lse(make, error, match):
    v = _valid()
    with pytest.raises(error, match=match):
        attention_scores(v["qs"][0], v["k_caches"][0], v["seq_lens"], heads=[0, 3], lse=make(v["lses"][0]))


def test_lse_checks_are_skipped_for_trusted_inputs():
    """The finite check reads values (a host sync on CUDA): skipped like the other value checks."""
    from dustin_kernels import trusted_inputs

    v = _valid()
    with trusted_inputs():
        attention_scores(v["qs"][0], v["k_caches"][0], v["seq_lens"], heads=[0, 3], lse=_nan_at(v["lses"][0], 3))


BAD_LAYERS = {
    "qs-tensor": ({"qs": torch.randn(2, 2, 4, 3, 16)}, TypeError, "^qs: expected a list"),
    "qs-none-layers": ({"qs": []}, ValueError, "^qs: expected 1 to 8 layers"),
    "qs-9-layers": ({"qs": [torch.randn(2, 4, 3, 16)] * 9}, ValueError, "^qs: expected 1 to 8 layers"),
    "k_caches-fewer": ({"k_caches": [torch.randn(2, 2, 20, 16)]}, ValueError,
                       r"^k_caches: expected one entry per layer of qs \(2\)"),
    "heads-fewer": ({"heads": [[0]]}, ValueError, "^heads: expected one entry per layer"),
    "heads-dict": ({"heads": {0: [0], 1: [1]}}, TypeError, "^heads: expected a list"),
    "lses-more": ({"lses": [torch.zeros(2, 4, 3)] * 3}, ValueError, "^lses: expected one entry per layer"),
    "qs0-rank": ({"qs": [torch.randn(4, 3, 16), torch.randn(2, 4, 3, 16)]}, ValueError, r"^qs\[0\]: expected 4 dims"),
    "k_caches0-head-dim": ({"k_caches": [torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 16)]}, ValueError,
                           r"^k_caches\[0\]: expected shape"),
    "qs1-shape": ({"qs": [torch.randn(2, 4, 3, 16), torch.randn(2, 4, 2, 16)]}, ValueError,
                  r"^qs\[1\]: expected shape \[2, 4, 3, 16\]"),
    "k_caches1-dtype": ({"k_caches": [torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16).half()]}, ValueError,
                        r"^k_caches\[1\]: expected shape .* and dtype torch.float32"),
    "k_caches1-device": ({"k_caches": [torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16, device="meta")]},
                         ValueError, r"^k_caches\[1\]: expected a tensor on cpu"),
    "heads1-out-of-range": ({"heads": [[0], [4]]}, ValueError, r"^heads\[1\]: expected q-head indices in \[0, 4\)"),
    "heads0-duplicate": ({"heads": [[1, 1], [0]]}, ValueError, r"^heads\[0\]: expected distinct"),
    "lses1-shape": ({"lses": [torch.zeros(2, 4, 3), torch.zeros(2, 4, 4)]}, ValueError, r"^lses\[1\]: expected shape"),
    "lses0-dtype": ({"lses": [torch.zeros(2, 4, 3, dtype=torch.float64), torch.zeros(2, 4, 3)]}, TypeError,
                    r"^lses\[0\]: expected dtype"),
    "lses1-nan": ({"lses": [torch.zeros(2, 4, 3), torch.full((2, 4, 3), float("nan"))]}, ValueError,
                  r"^lses\[1\]: expected finite values"),
    "seq_lens-beyond-cache": ({"seq_lens": torch.tensor([10, 21], dtype=torch.int32)}, ValueError, "^seq_lens:"),
    "block_size-3": ({"block_size": 3}, ValueError, "^block_size:"),
    "scale-negative": ({"scale": -1.0}, ValueError, "^scale:"),
    "backend-unknown": ({"backend": "cuda"}, ValueError, "^backend:"),
}


@pytest.mark.parametrize("changes, error, match", BAD_LAYERS.values(), ids=list(BAD_LAYERS))
def test_bad_layer_inputs(changes, error, match):
    args = {**_valid(), **changes}
    qs, ks, seq_lens = (args.pop(k) for k in ("qs", "k_caches", "seq_lens"))
    with pytest.raises(error, match=match):
        attention_scores_layers(qs, ks, seq_lens, **args)
