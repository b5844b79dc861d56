"""sparse_verify / sparse_verify_paged / dense_verify against the float64 references, both backends.

The "triton" backend runs the kernels in Triton's interpreter here: its cases are small and pairwise;
the torch backend covers the broader grid. Split-KV is forced with `dispatch.override`.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dustin_kernels import dense_verify, dispatch, ref, sparse_verify, sparse_verify_paged
from dustin_kernels.ops import verify
from dustin_kernels.spec import KernelSpec, Launch

from conftest import TOLERANCES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(lens, *, hkv=2, group=4, window=5, head_dim=64, dtype=torch.float32, n_max=None, nhd=False):
    """q [B, Hq, T, D] and caches [B, Hkv, N_max, D] (an NHD buffer viewed as HND when `nhd`), seq_lens."""
    B, n_max = len(lens), n_max or max(lens) + 3
    q = torch.randn(B, hkv * group, window, head_dim).to(dtype)
    if nhd:
        k = torch.randn(B, n_max, hkv, head_dim).to(dtype).transpose(1, 2)
        v = torch.randn(B, n_max, hkv, head_dim).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(B, hkv, n_max, head_dim).to(dtype)
        v = torch.randn(B, hkv, n_max, head_dim).to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32)


def history_blocks(seq_lens, window, block_size):
    return [math.ceil((int(L) - window) / block_size) for L in seq_lens]


def select(seq_lens, window, block_size, width, fraction=0.5, fill=-1):
    """A random sorted subset of each sequence's history blocks, padded with `fill` after count."""
    idx = torch.full((len(seq_lens), width), fill, dtype=torch.int32)
    count = torch.zeros(len(seq_lens), dtype=torch.int32)
    for b, n in enumerate(history_blocks(seq_lens, window, block_size)):
        c = min(width, n, max(1, round(fraction * n)) if n else 0)
        idx[b, :c] = torch.randperm(n)[:c].sort().values.to(torch.int32)
        count[b] = c
    return idx, count


def select_all(seq_lens, window, block_size):
    n = history_blocks(seq_lens, window, block_size)
    idx = torch.full((len(seq_lens), max(n)), -1, dtype=torch.int32)
    for b, nb in enumerate(n):
        idx[b, :nb] = torch.arange(nb, dtype=torch.int32)
    return idx, torch.tensor(n, dtype=torch.int32)


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)


def lse_reference(q, k, seq_lens, idx, count, block_size, scale=None):
    """float64[B, Hq, T] log-sum-exp of the scaled scores over the selected history and causal window."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    out = torch.empty(B, Hq, T, dtype=torch.float64)
    for b, L in enumerate(seq_lens.tolist()):
        ctx = L - T
        hist = [p for blk in idx[b, : int(count[b])].tolist()
                for p in range(blk * block_size, (blk + 1) * block_size) if p < ctx]
        for h in range(Hq):
            for t in range(T):
                pos = torch.tensor(hist + list(range(ctx, ctx + t + 1)))
                logits = k[b, h // G, pos].double() @ q[b, h, t].double() * scale
                out[b, h, t] = torch.logsumexp(logits, 0)
    return out


def sdpa_causal(q, k, v, seq_lens):
    """float64 torch SDPA with an explicit mask: query t of sequence b sees keys [0, seq_lens[b] - T + t]."""
    B, Hq, T, D = q.shape
    G, N = Hq // k.shape[1], k.shape[2]
    p_t = seq_lens.long()[:, None] - T + torch.arange(T)  # [B, T]
    mask = torch.arange(N)[None, None, :] <= p_t[:, :, None]  # [B, T, N]
    kk, vv = (x.double().repeat_interleave(G, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=mask[:, None])


def paged(k, v, seq_lens, page_size, spare=3):
    """The caches in shuffled physical pages, NHD buffers passed as [num_pages, Hkv, page_size, D] views;
    block_table entries past each sequence's pages are -1."""
    B, Hkv, N, D = k.shape
    max_pages = math.ceil(N / page_size)
    num_pages = B * max_pages + spare
    k_nhd = torch.randn(num_pages, page_size, Hkv, D).to(k.dtype)
    v_nhd = torch.randn(num_pages, page_size, Hkv, D).to(v.dtype)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    physical = torch.randperm(num_pages)
    for b, L in enumerate(seq_lens.tolist()):
        for p in range(math.ceil(L / page_size)):
            page = int(physical[b * max_pages + p])
            table[b, p] = page
            rows = slice(p * page_size, min(N, (p + 1) * page_size))
            n = rows.stop - rows.start
            k_nhd[page, :n] = k[b, :, rows].transpose(0, 1)
            v_nhd[page, :n] = v[b, :, rows].transpose(0, 1)
    return k_nhd.transpose(1, 2), v_nhd.transpose(1, 2), table


def case_id(dtype, D, G, T, bs):
    return f"{dtype}-D{D}-G{G}-T{T}-bs{bs}"


# (dtype, head_dim, group, window, block_size): triton cases pairwise over the axes; torch cases broader.
TRITON_CASES = [("fp32", 64, 1, 1, 1), ("fp16", 80, 4, 5, 16), ("bf16", 128, 8, 8, 1), ("fp32", 128, 4, 8, 16),
                ("bf16", 64, 4, 1, 16), ("fp16", 64, 8, 5, 1)]
TORCH_CASES = [(dt, D, G, T, bs) for dt in DTYPES for D in (64, 80, 128) for G, T in ((1, 1), (4, 5), (8, 8))
               for bs in (1, 16)]
CASES = ([pytest.param("triton", *c, id="triton-" + case_id(*c)) for c in TRITON_CASES]
         + [pytest.param("torch", *c, id="torch-" + case_id(*c)) for c in TORCH_CASES])


@pytest.mark.parametrize("backend, dtype, D, G, T, bs", CASES)
def test_random_subsets_match_reference(backend, dtype, D, G, T, bs):
    lens = [T + 83, T + 37] if backend == "triton" else [T + 150, T + 37, T + 1]  # ragged, not multiples of bs
    q, k, v, seq_lens = make_inputs(lens, group=G, window=T, head_dim=D, dtype=DTYPES[dtype], nhd=bs == 16)
    idx, count = select(seq_lens, T, bs, width=max(history_blocks(seq_lens, T, bs)) + 2)
    out = sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs), DTYPES[dtype])


@pytest.mark.parametrize("bs", [1, 16], ids=lambda bs: f"bs{bs}")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_blocks_equal_dense_causal_attention(backend, bs):
    q, k, v, seq_lens = make_inputs([101, 45], group=4, window=5, head_dim=64)
    idx, count = select_all(seq_lens, 5, bs)
    out = sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, backend=backend)
    assert_close(out, ref.dense_attention(q, k, v, seq_lens), torch.float32)
    assert_close(out, sdpa_causal(q, k, v, seq_lens), torch.float32)
    assert_close(dense_verify(q, k, v, seq_lens, backend=backend), sdpa_causal(q, k, v, seq_lens), torch.float32)


@pytest.mark.parametrize("backend, dtype", [("torch", "fp32"), ("torch", "bf16"), ("triton", "fp16"),
                                            ("triton", "fp32")])
def test_dense_verify_matches_reference(backend, dtype):
    q, k, v, seq_lens = make_inputs([77, 8, 130], group=2, window=8, head_dim=80, dtype=DTYPES[dtype], nhd=True)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous q
    out, lse = dense_verify(q, k, v, seq_lens, scale=0.1, return_lse=True, backend=backend)
    assert_close(out, ref.dense_attention(q, k, v, seq_lens, scale=0.1), DTYPES[dtype])
    idx, count = select_all(seq_lens, 8, 1)
    assert_close(lse, lse_reference(q, k, seq_lens, idx, count, 1, scale=0.1), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_count_zero_is_window_only(backend):
    q, k, v, seq_lens = make_inputs([60, 33], group=4, window=5)
    idx = torch.full((2, 4), -1, dtype=torch.int32)
    count = torch.zeros(2, dtype=torch.int32)
    out = sparse_verify(q, k, v, seq_lens, idx, count, backend=backend)
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count), torch.float32)
    # the first window row sees only its own key: softmax over one key is that key's value
    ctx = seq_lens.long() - 5
    first = torch.stack([v[b, :, ctx[b]] for b in range(2)]).repeat_interleave(4, dim=1)
    assert_close(out[:, :, 0], first.double(), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entries_past_count_are_ignored(backend):
    q, k, v, seq_lens = make_inputs([70, 50], group=2, window=3)
    idx, count = select(seq_lens, 3, 1, width=20, fraction=0.2)
    expected = sparse_verify(q, k, v, seq_lens, idx, count, backend=backend)
    garbage = torch.where(torch.arange(20)[None, :] < count[:, None], idx, torch.randint(-5, 10**6, idx.shape,
                                                                                          dtype=torch.int32))
    torch.testing.assert_close(sparse_verify(q, k, v, seq_lens, garbage, count, backend=backend), expected)


@pytest.mark.parametrize("backend, bs, page_size, dtype", [
    pytest.param(*c, id="{}-bs{}-page{}-{}".format(*c)) for c in [
        ("triton", 1, 16, "bf16"), ("triton", 16, 8, "fp32"),
        ("torch", 1, 1, "fp32"), ("torch", 16, 12, "fp16"), ("torch", 1, 16, "bf16"), ("torch", 16, 32, "fp32")]])
def test_paged_equals_contiguous(backend, bs, page_size, dtype):
    q, k, v, seq_lens = make_inputs([90, 41, 7], group=4, window=5, head_dim=64, dtype=DTYPES[dtype])
    idx, count = select(seq_lens, 5, bs, width=12)
    k_pages, v_pages, table = paged(k, v, seq_lens, page_size)
    out, lse = sparse_verify_paged(q, k_pages, v_pages, table, seq_lens, idx, count, block_size=bs,
                                   return_lse=True, backend=backend)
    out_c, lse_c = sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, return_lse=True, backend=backend)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs), DTYPES[dtype])


@pytest.mark.parametrize("variant", ["", "dense", "paged"], ids=["indexed", "dense", "paged"])
def test_split_kv_equals_unsplit(variant):
    q, k, v, seq_lens = make_inputs([200, 23], group=4, window=5, head_dim=64)  # fp32: HALF_PARTIALS is fp16/bf16
    idx, count = select(seq_lens, 5, 1, width=150, fraction=0.7)
    k_pages, v_pages, table = paged(k, v, seq_lens, 16)

    def run():
        if variant == "dense":
            return dense_verify(q, k, v, seq_lens, return_lse=True, backend="triton")
        if variant == "paged":
            return sparse_verify_paged(q, k_pages, v_pages, table, seq_lens, idx, count, return_lse=True,
                                       backend="triton")
        return sparse_verify(q, k, v, seq_lens, idx, count, return_lse=True, backend="triton")

    results = {}
    for splits in (1, 2, 3, 13):  # 13 > the tiles of the short sequence: some splits are empty
        config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "num_splits": splits, "HALF_PARTIALS": 0}
        with dispatch.override(config, kernel="sparse_verify"):
            results[splits] = run()
    expected = (ref.dense_attention(q, k, v, seq_lens) if variant == "dense"
                else ref.sparse_verify(q, k, v, seq_lens, idx, count))
    for splits, (out, lse) in results.items():
        assert_close(out, expected, torch.float32)
        torch.testing.assert_close(out, results[1][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse, results[1][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_partials(dtype):
    """HALF_PARTIALS: the splits' partial outputs in q's dtype, merged in fp32; the result stays within the
    dtype's tolerance of the reference and within one rounding of the fp32 workspace."""
    q, k, v, seq_lens = make_inputs([200, 23], group=4, window=5, head_dim=64, dtype=DTYPES[dtype])
    idx, count = select(seq_lens, 5, 1, width=150, fraction=0.7)
    results = {}
    for half in (0, 1):
        config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "num_splits": 3, "HALF_PARTIALS": half}
        with dispatch.override(config, kernel="sparse_verify"):
            results[half] = sparse_verify(q, k, v, seq_lens, idx, count, return_lse=True, backend="triton")
    expected = ref.sparse_verify(q, k, v, seq_lens, idx, count)
    for out, _ in results.values():
        assert out.dtype == DTYPES[dtype]
        assert_close(out, expected, DTYPES[dtype])
    torch.testing.assert_close(results[1][1], results[0][1])  # the LSE stays fp32
    eps = torch.finfo(DTYPES[dtype]).eps
    diff = (results[1][0].float() - results[0][0].float()).abs()
    assert diff.max() <= 4 * eps * results[0][0].float().abs().max()


@pytest.mark.parametrize("backend, dtype, bs", [
    pytest.param(*c, id="{}-{}-bs{}".format(*c))
    for c in [("torch", "bf16", 16), ("torch", "fp32", 1), ("triton", "bf16", 1), ("triton", "fp16", 16)]])
def test_lse_matches_float64(backend, dtype, bs):
    q, k, v, seq_lens = make_inputs([120, 39], group=4, window=4, head_dim=64, dtype=DTYPES[dtype])
    idx, count = select(seq_lens, 4, bs, width=8)
    out, lse = sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, scale=0.2, return_lse=True,
                             backend=backend)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(lse, lse_reference(q, k, seq_lens, idx, count, bs, scale=0.2), torch.float32)
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, scale=0.2), DTYPES[dtype])


@pytest.mark.parametrize("D", [8, 40], ids=lambda d: f"D{d}")
def test_head_dims_below_and_off_16(D, monkeypatch):
    """D 8 (below tl.dot's K >= 16 on NVIDIA GPUs) and D 40 (not a multiple of 16), with the GPU's dot
    shape rule imposed on the interpreter."""
    from triton.runtime import interpreter
    monkeypatch.setitem(interpreter.interpreter_builder.codegen_fns, "min_dot_size", lambda lhs, rhs: (1, 1, 16))
    q, k, v, seq_lens = make_inputs([45, 22], group=2, window=3, head_dim=D)
    idx, count = select(seq_lens, 3, 1, width=30)
    out = sparse_verify(q, k, v, seq_lens, idx, count, backend="triton")
    assert_close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count), torch.float32)
    assert_close(dense_verify(q, k, v, seq_lens, backend="triton"), ref.dense_attention(q, k, v, seq_lens),
                 torch.float32)


def test_torch_backend_chunks_long_histories(monkeypatch):
    monkeypatch.setattr(verify, "_TORCH_CHUNK_ELEMS", 1)  # the smallest chunk (128 keys): several chunks
    q, k, v, seq_lens = make_inputs([400, 131], group=2, window=5, head_dim=64)
    idx, count = select(seq_lens, 5, 1, width=300, fraction=0.9)
    assert_close(sparse_verify(q, k, v, seq_lens, idx, count), ref.sparse_verify(q, k, v, seq_lens, idx, count),
                 torch.float32)
    assert_close(dense_verify(q, k, v, seq_lens), ref.dense_attention(q, k, v, seq_lens), torch.float32)


def test_default_config_rule():
    spec = KernelSpec("sparse_verify", "sm90", "bf16", head_dim=128, group=8, window=5)
    cfg = verify.default_config(Launch(spec, 16, 512, 8))
    assert cfg == {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": 2,  # one wave: ceil(132 / 128)
                   "HALF_PARTIALS": 0}
    assert verify.default_config(Launch(spec, 1, 131072, 8))["num_splits"] == 17
    sm80 = KernelSpec("sparse_verify", "sm80", "bf16", head_dim=128, group=8, window=5)
    assert verify.default_config(Launch(sm80, 1, 131072, 8))["num_splits"] == 27  # two waves
    assert verify.default_config(Launch(spec, 1, 100, 8))["num_splits"] == 2  # capped by tiles
    assert verify.default_config(Launch(spec, 64, 512, 8))["num_splits"] == 1


# ----------------------------------------------------------------------------------------------------
# bad inputs: every error names the argument


def _good(lens=(40, 30), width=6):
    q, k, v, seq_lens = make_inputs(list(lens), group=2, window=4)
    idx, count = select(seq_lens, 4, 1, width=width)
    return dict(q=q, k_cache=k, v_cache=v, seq_lens=seq_lens, idx=idx, count=count)


@pytest.mark.parametrize("name, change, error", [pytest.param(*c[1:], id=c[0]) for c in [
    ("idx-batch", "idx", lambda a: a["idx"][:1], ValueError),
    ("idx-ndim", "idx", lambda a: a["idx"][:, :, None], ValueError),
    ("idx-dtype", "idx", lambda a: a["idx"].long(), TypeError),
    ("count-batch", "count", lambda a: a["count"][:1], ValueError),
    ("count-dtype", "count", lambda a: a["count"].float(), TypeError),
    ("idx-list", "idx", lambda a: a["idx"].tolist(), TypeError),
    ("count-list", "count", lambda a: a["count"].tolist(), TypeError),
    ("count-over-width", "count", lambda a: torch.tensor([7, 1], dtype=torch.int32), ValueError),  # width 6
    ("count-negative", "count", lambda a: torch.tensor([-1, 1], dtype=torch.int32), ValueError),
    ("v_cache-dtype", "v_cache", lambda a: a["v_cache"].half(), TypeError),
    ("v_cache-shape", "v_cache", lambda a: a["v_cache"][:, :, :-1], ValueError),
    ("k_cache-dtype", "k_cache", lambda a: a["k_cache"].half(), TypeError),
    ("q-dtype", "q", lambda a: a["q"].int(), TypeError),
    ("seq_lens-dtype", "seq_lens", lambda a: a["seq_lens"].long(), TypeError),
    ("seq_lens-below-window", "seq_lens", lambda a: torch.tensor([40, 3], dtype=torch.int32), ValueError),
]])
def test_bad_inputs_name_the_argument(name, change, error):
    args = _good()
    args[name] = change(args)
    with pytest.raises(error, match=name):
        sparse_verify(**args)


@pytest.mark.parametrize("value, problem", [(36, "past the history"), (-1, "negative"), ("dup", "distinct")],
                         ids=["past-history", "negative", "repeated"])
def test_bad_block_indices(value, problem):
    args = _good()
    idx = args["idx"].clone()
    idx[0, 1] = idx[0, 0] if value == "dup" else value  # 36 = ctx_len of sequence 0: one past its last block
    with pytest.raises(ValueError, match=f"idx: .*{problem}"):
        sparse_verify(**{**args, "idx": idx})


def test_block_index_past_the_history_counts_blocks():
    args = _good()  # ctx_len 36 and 26: history blocks of 16 tokens are 0..2 and 0..1
    idx = torch.tensor([[0, 2, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1]], dtype=torch.int32)
    count = torch.tensor([2, 2], dtype=torch.int32)
    sparse_verify(**{**args, "idx": idx, "count": count}, block_size=16)
    with pytest.raises(ValueError, match="idx: .*past the history"):
        sparse_verify(**{**args, "idx": idx.flip(0), "count": count}, block_size=16)


@pytest.mark.parametrize("kwargs, name", [pytest.param(kw, name, id=name) for kw, name in [
    ({"block_size": 12}, "block_size"), ({"scale": -1.0}, "scale"), ({"scale": float("inf")}, "scale"),
    ({"return_lse": 1}, "return_lse"),
    ({"backend": "cuda"}, "backend")]])
def test_bad_options(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=name):
        sparse_verify(**_good(), **kwargs)


def test_bad_paged_inputs():
    a = _good()
    k_pages, v_pages, table = paged(a["k_cache"], a["v_cache"], a["seq_lens"], 8)
    good = dict(q=a["q"], k_pages=k_pages, v_pages=v_pages, block_table=table, seq_lens=a["seq_lens"],
                idx=a["idx"], count=a["count"])
    sparse_verify_paged(**good)
    bad_page = table.clone()
    bad_page[0, 0] = k_pages.shape[0]
    for name, value, error, match in [
            ("block_table", table.long(), TypeError, "block_table"),
            ("block_table", table[:1], ValueError, "block_table"),
            ("block_table", bad_page, ValueError, "block_table"),
            ("block_table", table[:, :2], ValueError, "seq_lens"),  # 2 pages of 8 cannot hold 40 tokens
            ("v_pages", v_pages.half(), TypeError, "v_pages"),
            ("k_pages", k_pages.half(), TypeError, "k_pages"),
            ("k_pages", k_pages[..., :-1], ValueError, "k_pages")]:
        with pytest.raises(error, match=match):
            sparse_verify_paged(**{**good, name: value})


def test_bad_dense_inputs():
    a = _good()
    with pytest.raises(TypeError, match="v_cache"):
        dense_verify(a["q"], a["k_cache"], a["v_cache"].half(), a["seq_lens"])
    with pytest.raises(ValueError, match="k_cache"):
        dense_verify(a["q"], a["k_cache"][:1], a["v_cache"], a["seq_lens"])
