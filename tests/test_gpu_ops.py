"""GPU tier: the compiled Triton kernels (not the interpreter) on CUDA tensors against the float64
references, at model shapes. Run by `tools/gpu_check.sh` as `TRITON_INTERPRET=0 pytest -m gpu`."""
import math

import pytest
import torch

from dustin_kernels import attention_scores, dense_verify, ref, select_tokens, sparse_verify, sparse_verify_paged

from conftest import TOLERANCES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (Hq, Hkv, D, T, block_size): the Qwen2.5-72B verification shape, the draft's, odd head dims
SHAPES = [(64, 8, 128, 5, 1), (64, 8, 128, 5, 16), (14, 2, 64, 5, 1), (28, 4, 80, 1, 1), (32, 8, 96, 8, 16)]


def _problem(Hq, Hkv, D, T, dtype, lens=(3001, 1777, 4099)):
    B, n_max = len(lens), max(lens) + 13
    q = torch.randn(B, Hq, T, D, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, n_max, D, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, n_max, D, device="cuda").to(dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device="cuda")


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Hq, Hkv, D, T, bs", SHAPES, ids=lambda x: str(x))
def test_three_ops_match_reference(Hq, Hkv, D, T, bs, dtype):
    q, k, v, seq_lens = _problem(Hq, Hkv, D, T, dtype)
    heads = [0, Hq - 1, Hq // 2, 1]
    scores = attention_scores(q, k, seq_lens, heads=heads, block_size=bs, backend="triton")
    _close(scores, ref.attention_scores(q, k, seq_lens, heads=heads, block_size=bs), torch.float32)

    budget, m = 96, 32
    idx, count = select_tokens(scores, scores.flip(1).contiguous(), seq_lens, budget=budget, m=m, window=T,
                               block_size=bs, sink=4, recent=16, backend="triton")
    ridx, rcount = ref.select_tokens(scores.cpu(), scores.flip(1).cpu(), seq_lens.cpu(), budget, m, 4, 16, T, bs)
    assert torch.equal(idx.cpu().long(), ridx) and torch.equal(count.cpu().long(), rcount)

    out = sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs, backend="triton")
    _close(out, ref.sparse_verify(q, k, v, seq_lens, idx, count, block_size=bs), dtype)


@pytest.mark.parametrize("Hq, Hkv, D, T, bs", [(64, 8, 128, 1, 1), (14, 2, 64, 5, 1), (28, 4, 80, 5, 16)],
                         ids=lambda x: str(x))
def test_attention_scores_one_pass(Hq, Hkv, D, T, bs):
    """ONE_PASS (per-block sums rescaled instead of a second read of K), compiled, at model shapes."""
    from dustin_kernels import dispatch
    from dustin_kernels.ops import scores as ops_scores
    from dustin_kernels.spec import KernelSpec, Launch

    q, k, v, seq_lens = _problem(Hq, Hkv, D, T, torch.bfloat16)
    heads = [0, Hq // 4, Hq // 2, 3 * Hq // 4]
    group = max(sum(h // (Hq // Hkv) == kv for h in heads) for kv in range(Hkv))  # selected heads per KV head
    spec = KernelSpec("attention_scores", dispatch.arch_for(q.device), "bf16", D, group, T, bs)
    config = {**ops_scores.default_config(Launch(spec, 3, k.shape[2])), "ONE_PASS": 1}
    with dispatch.override(config, kernel="attention_scores"):
        scores = attention_scores(q, k, seq_lens, heads=heads, block_size=bs, backend="triton")
    _close(scores, ref.attention_scores(q, k, seq_lens, heads=heads, block_size=bs), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_dense_and_paged_match_reference(dtype):
    q, k, v, seq_lens = _problem(64, 8, 128, 5, dtype)
    _close(dense_verify(q, k, v, seq_lens, backend="triton"), ref.dense_attention(q, k, v, seq_lens), dtype)

    page = 16
    B, Hkv, n_max, D = k.shape
    pages_per_seq = math.ceil(n_max / page)
    perm = torch.randperm(B * pages_per_seq, device="cuda")
    table = perm.view(B, pages_per_seq).to(torch.int32)
    padded = torch.nn.functional.pad(k, (0, 0, 0, pages_per_seq * page - n_max))
    k_pages = torch.empty(B * pages_per_seq, page, Hkv, D, device="cuda", dtype=dtype)  # NHD pages
    k_pages[perm] = padded.view(B, Hkv, pages_per_seq, page, D).permute(0, 2, 3, 1, 4).reshape(-1, page, Hkv, D)
    v_pages = torch.empty_like(k_pages)
    padded = torch.nn.functional.pad(v, (0, 0, 0, pages_per_seq * page - n_max))
    v_pages[perm] = padded.view(B, Hkv, pages_per_seq, page, D).permute(0, 2, 3, 1, 4).reshape(-1, page, Hkv, D)
    idx = torch.stack([torch.randperm(int(L) - 5, device="cuda")[:300].sort().values for L in seq_lens]).int()
    count = torch.full((B,), 300, dtype=torch.int32, device="cuda")
    paged = sparse_verify_paged(q, k_pages.transpose(1, 2), v_pages.transpose(1, 2), table, seq_lens, idx, count,
                                backend="triton")
    _close(paged, ref.sparse_verify(q, k, v, seq_lens, idx, count), dtype)
