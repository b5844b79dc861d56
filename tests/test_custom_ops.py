"""torch.ops.dustin_kernels.*: opcheck, torch.compile(fullgraph=True) and torch.export of scores -> select ->
verify, trusted_inputs() under compile, and the ops' `out=` buffers."""
import pytest
import torch

import dustin_kernels
from dustin_kernels import attention_scores, dense_verify, select_tokens, sparse_verify, sparse_verify_paged, ref

B, HKV, G, T, D, N = 2, 2, 2, 3, 16, 40
BUDGET, M = 8, 2


def inputs(batch=B):
    q = torch.randn(batch, HKV * G, T, D)
    k, v = torch.randn(2, batch, HKV, N, D).unbind(0)
    seq_lens = torch.tensor([N, N - 13, N - 2, N - 30][:batch] * (batch // 4 + 1), dtype=torch.int32)[:batch]
    return q, k, v, seq_lens


def paged(cache, page_size=8):
    """[B, Hkv, N, D] as pages [B * N / page_size, Hkv, page_size, D] and its block table int32[B, N / page_size]."""
    pages = cache.reshape(B, HKV, N // page_size, page_size, D).transpose(1, 2).reshape(-1, HKV, page_size, D)
    return pages, torch.arange(pages.shape[0], dtype=torch.int32).reshape(B, N // page_size)


def step(q, k, v, seq_lens, backend="torch"):
    """The three ops of a verification step: scores -> select -> verify."""
    s_draft = attention_scores(q, k, seq_lens, heads=[0, 3], backend=backend)
    s_target = attention_scores(q[:, :, -1:], k, seq_lens - (T - 1), heads=[1], backend=backend)
    idx, count = select_tokens(s_draft, s_target, seq_lens, budget=BUDGET, m=M, sink=1, recent=2, window=T,
                               backend=backend)
    return sparse_verify(q, k, v, seq_lens, idx, count, backend=backend), idx, count


def op_args(backend):
    """(op, args) of every custom op on small inputs."""
    q, k, v, seq_lens = inputs()
    scores = torch.rand(B, N)
    idx, count = select_tokens(scores, scores, seq_lens, budget=BUDGET, m=M, sink=1, recent=2, window=T)
    out, lse = torch.empty_like(q), torch.empty(B, HKV * G, T)
    pages, table = paged(k)
    ops = torch.ops.dustin_kernels
    return {
        "attention_scores": (ops.attention_scores, (q, k, seq_lens, torch.empty(B, N), [0, 3], 1, 0.25, backend)),
        "select_tokens": (ops.select_tokens, (scores, scores, seq_lens, torch.empty(B, BUDGET, dtype=torch.int32),
                                              torch.empty(B, dtype=torch.int32), BUDGET, M, 1, 2, T, 1, backend)),
        "sparse_verify": (ops.sparse_verify, (q, k, v, seq_lens, idx, count, out, lse, 1, 0.25, backend)),
        "sparse_verify_paged": (ops.sparse_verify_paged,
                                (q, pages, pages, table, seq_lens, idx, count, out, lse, 1, 0.25, backend)),
        "dense_verify": (ops.dense_verify, (q, k, v, seq_lens, out, lse, 0.25, backend)),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["attention_scores", "select_tokens", "sparse_verify", "sparse_verify_paged",
                                  "dense_verify"])
def test_opcheck(name, backend):
    op, args = op_args(backend)[name]
    torch.library.opcheck(op, args)


def test_compiled_step_equals_eager():
    q, k, v, seq_lens = inputs()
    eager = step(q, k, v, seq_lens)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, seq_lens)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_inductor_and_triton_backend():
    q, k, v, seq_lens = inputs()
    out = torch.compile(step, fullgraph=True)(q, k, v, seq_lens, "triton")[0]
    idx, count = step(q, k, v, seq_lens)[1:]
    expected = ref.sparse_verify(q.double(), k.double(), v.double(), seq_lens, idx, count)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


class Step(torch.nn.Module):
    def forward(self, q, k, v, seq_lens):
        return step(q, k, v, seq_lens)[0]


def test_export_with_dynamic_batch():
    batch = torch.export.Dim("batch", min=2, max=64)
    dims = {"q": {0: batch}, "k": {0: batch}, "v": {0: batch}, "seq_lens": {0: batch}}
    program = torch.export.export(Step(), inputs(2), dynamic_shapes=dims, strict=True)
    ops = torch.ops.dustin_kernels
    called = {node.target for node in program.graph.nodes}
    assert {ops.attention_scores.default, ops.select_tokens.default, ops.sparse_verify.default} <= called
    for n in (2, 5):
        args = inputs(n)
        torch.testing.assert_close(program.module()(*args), Step()(*args), atol=0, rtol=0)


def test_trusted_inputs_under_fullgraph_compile():
    @dustin_kernels.trusted_inputs()
    def decorated(q, k, v, seq_lens):
        return step(q, k, v, seq_lens)[0]

    def with_block(q, k, v, seq_lens):
        with dustin_kernels.trusted_inputs():
            return step(q, k, v, seq_lens)[0]

    q, k, v, seq_lens = inputs()
    expected = step(q, k, v, seq_lens)[0]
    for fn in (decorated, with_block):
        torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(q, k, v, seq_lens), expected)
        torch.testing.assert_close(fn(q, k, v, seq_lens), expected)
    too_long = seq_lens + N  # eager: the value checks are back after the block
    with pytest.raises(ValueError, match="seq_lens"):
        sparse_verify(q, k, v, too_long, *step(q, k, v, seq_lens)[1:])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_buffers_are_written(backend):
    q, k, v, seq_lens = inputs()
    scores = torch.full((B, N), float("nan"))
    assert attention_scores(q, k, seq_lens, heads=[0, 3], backend=backend, out=scores) is scores
    torch.testing.assert_close(scores, attention_scores(q, k, seq_lens, heads=[0, 3], backend=backend))
    buffers = (torch.full((B, BUDGET), 7, dtype=torch.int32), torch.full((B,), 7, dtype=torch.int32))
    idx, count = select_tokens(scores, None, seq_lens, budget=BUDGET, m=M, window=T, sink=1, recent=2,
                               backend=backend, out=buffers)
    assert idx is buffers[0] and count is buffers[1]
    expected = select_tokens(scores, None, seq_lens, budget=BUDGET, m=M, window=T, sink=1, recent=2, backend=backend)
    assert torch.equal(idx, expected[0]) and torch.equal(count, expected[1])
    for fn, args in ((sparse_verify, (q, k, v, seq_lens, idx, count)), (dense_verify, (q, k, v, seq_lens))):
        out = torch.full_like(q, float("nan"))
        result, lse = fn(*args, backend=backend, out=out, return_lse=True)
        assert result is out
        torch.testing.assert_close(out, fn(*args, backend=backend), atol=0, rtol=0)
    (k_pages, table), (v_pages, _) = paged(k), paged(v)
    out = torch.empty_like(q)
    assert sparse_verify_paged(q, k_pages, v_pages, table, seq_lens, idx, count, backend=backend, out=out) is out
    torch.testing.assert_close(out, sparse_verify(q, k, v, seq_lens, idx, count, backend=backend))


@pytest.mark.parametrize("out, match", [
    (torch.empty(B, N + 1), r"out: expected a float32 tensor \[2, 40\] on cpu, got float32 \[2, 41\]"),
    (torch.empty(B, N, dtype=torch.float16), "out: expected a float32 tensor"),
    (torch.empty(N, B).t(), "out: expected a contiguous tensor"),
    (torch.empty(B, N, requires_grad=True), "out: expected a tensor that does not require grad"),
    ("buffer", "out: expected None or a torch.Tensor"),
])
def test_bad_out_names_out(out, match):
    q, k, _, seq_lens = inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        attention_scores(q, k, seq_lens, out=out)


def test_bad_out_of_select_and_verify():
    q, k, v, seq_lens = inputs()
    scores = torch.rand(B, N)
    kwargs = dict(budget=BUDGET, m=M, window=T, sink=1, recent=2)
    with pytest.raises(TypeError, match=r"out: expected None or a pair \(idx"):
        select_tokens(scores, None, seq_lens, **kwargs, out=torch.empty(B, BUDGET, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"out\[1\] \(count\): expected a int32 tensor \[2\]"):
        select_tokens(scores, None, seq_lens, **kwargs, out=(torch.empty(B, BUDGET, dtype=torch.int32),
                                                              torch.empty(B, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"out: expected a float32 tensor \[2, 4, 3, 16\]"):
        dense_verify(q, k, v, seq_lens, out=torch.empty(B, HKV * G, T, D + 1))
