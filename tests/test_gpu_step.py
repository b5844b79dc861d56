"""GPU tier: what Triton's interpreter cannot show. It runs a launch's programs one after another, so the
last-arrival merges (sparse_verify's splits, select_tokens' chunks) never race there; a CUDA graph's replays
(the arrival counters back at 0 for the next replay, lengths and selections read on the device) and the
compiled decode step under CUDA graphs need a GPU. Run by `tools/gpu_check.sh` (`pytest -m gpu`)."""
import contextlib

import pytest
import torch
from torch._dynamo.utils import counters

from dustin_kernels import (VerifyPlan, attention_scores_layers, dense_verify, dispatch, ref, select_tokens,
                            sparse_verify, testbed)
from dustin_kernels.policies import make_policy
from dustin_kernels.speculative import generate

from conftest import TOLERANCES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

T, BUDGET, M = 5, 512, 128


def _close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected, atol=atol, rtol=rtol)


def _verify_problem(batch=16, q_heads=64, kv_heads=8, head_dim=128, context=8192, seed=0):
    """The 72B verification shape: bf16 q, K, V; ragged lengths; BUDGET sorted distinct history positions
    per sequence (fewer in the last one); NaN in every cache slot past its sequence."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n_max = context + T + 7
    q = torch.randn(batch, q_heads, T, head_dim, device="cuda", generator=g).bfloat16()
    k = torch.randn(batch, kv_heads, n_max, head_dim, device="cuda", generator=g).bfloat16()
    v = torch.randn(batch, kv_heads, n_max, head_dim, device="cuda", generator=g).bfloat16()
    seq_lens = (context + T - 13 * torch.arange(batch, device="cuda")).int()
    for b, length in enumerate(seq_lens.tolist()):
        k[b, :, length:] = v[b, :, length:] = float("nan")
    history = [torch.randperm(length - T, device="cuda", generator=g)[:BUDGET].sort().values
               for length in seq_lens.tolist()]
    idx = torch.stack(history).int()
    count = torch.full((batch,), BUDGET, dtype=torch.int32, device="cuda")
    count[-1] = BUDGET // 3
    return q, k, v, seq_lens, idx, count


@pytest.mark.parametrize("splits, half", [(2, 0), (3, 0), (8, 0), (3, 1)], ids=lambda x: str(x))
def test_split_merge_under_concurrency(splits, half):
    """Every split of a (sequence, KV head) runs at once; the last to arrive merges and resets the counter.
    Twenty launches from one plan (one workspace) all equal the float64 reference: a merge that read a
    partial before it was written, or a counter left non-zero, would show."""
    q, k, v, seq_lens, idx, count = _verify_problem()
    expected = ref.sparse_verify(q.cpu(), k.cpu(), v.cpu(), seq_lens.cpu(), idx.cpu(), count.cpu())
    config = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": splits, "HALF_PARTIALS": half}
    with dispatch.override(config, kernel="sparse_verify"):
        plan = VerifyPlan(q, k, v, seq_lens, idx, count, backend="triton")
        for _ in range(20):
            out = plan.run(q, k, v)
            assert not out.isnan().any()
            _close(out, expected, torch.bfloat16)


@pytest.mark.parametrize("chunk", [1024, None], ids=["chunk1024", "default"])
def test_chunk_merge_under_concurrency(chunk):
    """8K score columns with heavy ties: each row's chunk programs run at once and the last merges. Ten
    launches all equal the reference exactly."""
    g = torch.Generator(device="cuda").manual_seed(1)
    batch, width = 4, 8192
    s_draft = (torch.rand(batch, width, device="cuda", generator=g) * 50).floor()
    s_target = (torch.rand(batch, width, device="cuda", generator=g) * 50).floor()
    seq_lens = torch.tensor([width, width - 333, 4000, 600], dtype=torch.int32, device="cuda") + T
    want_idx, want_count = ref.select_tokens(s_draft.cpu().double(), s_target.cpu().double(), seq_lens.cpu(),
                                             BUDGET, M, 4, 16, T, 1)
    config = {"CHUNK": chunk, "TILE": 256, "RADIX_BITS": 7, "num_warps": 4, "num_stages": 1}
    with dispatch.override(config, kernel="select_tokens") if chunk else contextlib.nullcontext():
        for _ in range(10):
            idx, count = select_tokens(s_draft, s_target, seq_lens, budget=BUDGET, m=M, window=T, backend="triton")
            assert torch.equal(idx.cpu().long(), want_idx) and torch.equal(count.cpu().long(), want_count)


DRAFT_HEADS = [[0, 3, 7, 10], [1, 2, 8, 13], [4, 5, 6, 11]]  # 4 of 14 q heads in each of 3 retrieval layers


def _draft_layers(batch, n_max, seed):
    """The 0.5B draft's retrieval layers: per layer q [B, 14, T, 64], K and V [B, 2, n_max, 64], bf16."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = ((batch, 14, T, 64), (batch, 2, n_max, 64), (batch, 2, n_max, 64))
    return [tuple(torch.randn(s, device="cuda", generator=g).bfloat16() for s in shapes) for _ in DRAFT_HEADS]


def test_captured_selection_and_verification_replays():
    """The step's kernels captured in one CUDA graph (draft attention with lse, the lookahead of 3 layers in
    one launch, select_tokens, sparse_verify in 3 splits), then replayed on new queries, scores and
    lengths written into the captured buffers: each replay's scores, selection and attention equal the
    references computed from that replay's inputs."""
    q, k, v, seq_lens, _, _ = _verify_problem(batch=4, context=4096)
    layers = _draft_layers(4, k.shape[2], seed=2)
    s_target = torch.rand(4, k.shape[2], device="cuda")
    outputs = {}

    def step():
        lses = [dense_verify(qd, kd, vd, seq_lens, return_lse=True)[1] for qd, kd, vd in layers]
        s_draft = attention_scores_layers([qd for qd, _, _ in layers], [kd for _, kd, _ in layers], seq_lens,
                                          heads=DRAFT_HEADS, lses=lses)
        idx, count = select_tokens(s_draft, s_target, seq_lens, budget=BUDGET, m=M, window=T)
        outputs.update(s_draft=s_draft, idx=idx, count=count, out=sparse_verify(q, k, v, seq_lens, idx, count))

    config = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": 3, "HALF_PARTIALS": 0}
    with dispatch.override(config, kernel="sparse_verify"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compiles the kernels before the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    g = torch.Generator(device="cuda").manual_seed(3)
    for replay in range(3):
        for qd, _, _ in layers:
            qd.copy_(torch.randn(qd.shape, device="cuda", generator=g))
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        s_target.copy_(torch.rand(s_target.shape, device="cuda", generator=g))
        seq_lens.copy_(seq_lens - 100 * replay)  # shorter histories; the NaN tails stay past them
        graph.replay()
        torch.cuda.synchronize()
        lens = seq_lens.cpu()
        expected = sum(ref.attention_scores(qd.cpu(), kd.cpu(), lens, heads) for (qd, kd, _), heads
                       in zip(layers, DRAFT_HEADS))
        _close(outputs["s_draft"], expected, torch.float32)
        want_idx, want_count = ref.select_tokens(outputs["s_draft"].cpu().double(), s_target.cpu().double(), lens,
                                                 BUDGET, M, 4, 16, T, 1)
        assert torch.equal(outputs["idx"].cpu().long(), want_idx)
        assert torch.equal(outputs["count"].cpu().long(), want_count)
        _close(outputs["out"], ref.sparse_verify(q.cpu(), k.cpu(), v.cpu(), lens, outputs["idx"].cpu(),
                                                 outputs["count"].cpu()), torch.bfloat16)


def test_compiled_step_replays_cuda_graphs():
    """generate(compile=True) on CUDA in bf16 (the generator's GPU default): Inductor with CUDA graphs
    (reduce-overhead), no CUDA-graph skip, the tokens of the eager step (the testbed's logits leave wide
    margins), every planted value recalled, and no graph built after the first run."""
    spec = testbed.TestbedSpec()
    draft, target = testbed.models(spec, device="cuda", dtype=torch.bfloat16)
    prompts = [testbed.prompt(spec, n, seed=s) for s, n in ((0, 1500), (1, 1100))]
    ids, values = [p for p, _ in prompts], [v for _, v in prompts]
    policy = make_policy("dustin", testbed.profile(spec), budget=64)
    kw = dict(max_new_tokens=8, eos_ids=(), policy=policy, max_len=1600)
    eager = generate(draft, target, ids, **kw)
    torch._dynamo.reset()
    skips = counters["inductor"]["cudagraph_skips"]
    compiled = generate(draft, target, ids, compile=True, **kw)
    graphs = counters["stats"]["unique_graphs"]
    again = generate(draft, target, ids, compile=True, **kw)  # new caches: re-recorded, not recompiled
    assert counters["inductor"]["cudagraph_skips"] == skips
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled.tokens == again.tokens == eager.tokens
    assert all(testbed.recall(t, v) == 1.0 for t, v in zip(compiled.tokens, values))
    assert compiled.stats.kv_read_bytes == eager.stats.kv_read_bytes
