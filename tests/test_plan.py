"""VerifyPlan: one plan per step, `run` per layer equals `sparse_verify` / `dense_verify` into the plan's
buffers; bad inputs fail at plan time."""
import contextlib

import pytest
import torch

from dustin_kernels import VerifyPlan, dense_verify, dispatch, ref, sparse_verify

B, HKV, G, T, D, N, LAYERS = 3, 2, 2, 3, 16, 48, 3


def problem():
    q = torch.randn(LAYERS, B, HKV * G, T, D)
    k, v = torch.randn(2, LAYERS, B, HKV, N, D).unbind(0)
    seq_lens = torch.tensor([N, 20, 37], dtype=torch.int32)
    idx = torch.tensor([[0, 3, 5, -1], [1, 2, -1, -1], [0, 4, 6, 7]], dtype=torch.int32)
    return q, k, v, seq_lens, idx, torch.tensor([3, 2, 4], dtype=torch.int32)


@pytest.mark.parametrize("backend, splits", [("torch", None), ("triton", 1), ("triton", 2)])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_run_equals_the_op_for_every_layer(backend, splits, dense):
    q, k, v, seq_lens, idx, count = problem()
    selection = () if dense else (idx, count)
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "num_splits": splits, "HALF_PARTIALS": 0}

    def pinned():
        return dispatch.override(config, kernel="sparse_verify") if splits else contextlib.nullcontext()

    with pinned():
        plan = VerifyPlan(q[0], k[0], v[0], seq_lens, *selection, block_size=4, backend=backend)
    op = dense_verify if dense else sparse_verify
    kwargs = {} if dense else {"block_size": 4}
    for layer in range(LAYERS):
        out = plan.run(q[layer], k[layer], v[layer])
        assert out is plan.out
        layer_args = (q[layer].double(), k[layer].double(), v[layer].double(), seq_lens)
        expected = (ref.dense_attention(*layer_args) if dense
                    else ref.sparse_verify(*layer_args, idx, count, block_size=4))
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        with pinned():
            same, lse = op(q[layer], k[layer], v[layer], seq_lens, *selection, **kwargs, backend=backend,
                           return_lse=True)
        torch.testing.assert_close(out, same, atol=0, rtol=0)
        torch.testing.assert_close(plan.lse, lse, atol=0, rtol=0)


@pytest.mark.parametrize("splits", [None, 3], ids=["default", "splits3"])
def test_run_looks_nothing_up_and_allocates_nothing(monkeypatch, splits):
    """With split-KV the plan owns the partials and the arrival counters; runs reuse them."""
    q, k, v, seq_lens, idx, count = problem()
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "num_splits": splits, "HALF_PARTIALS": 0}
    pinned = dispatch.override(config, kernel="sparse_verify") if splits else contextlib.nullcontext()
    with pinned, dispatch.record() as calls:
        plan = VerifyPlan(q[0], k[0], v[0], seq_lens, idx, count, block_size=4, backend="triton")
    assert len(calls) == 1
    buffer = torch.empty_like(q[0])
    for name in ("empty", "empty_like", "zeros", "full"):
        monkeypatch.setattr(torch, name, lambda *args, **kwargs: pytest.fail("run allocated a tensor"))
    with dispatch.record() as calls:
        first = plan.run(q[0], k[0], v[0])
        second = plan.run(q[1], k[1], v[1], out=buffer)
    assert not calls  # no config lookup per layer
    assert first is plan.out and second is buffer
    monkeypatch.undo()
    torch.testing.assert_close(buffer, sparse_verify(q[1], k[1], v[1], seq_lens, idx, count, block_size=4))


@pytest.mark.parametrize("change, error, match", [
    (lambda a: {**a, "seq_lens": a["seq_lens"] + N}, ValueError, "seq_lens: lengths must not exceed"),
    (lambda a: {**a, "idx": a["idx"] + 9}, ValueError, "idx: block index past the history"),
    (lambda a: {**a, "count": None}, ValueError, "idx, count: expected both"),
    (lambda a: {**a, "v_cache": a["v_cache"].half()}, TypeError, "v_cache: expected dtype"),
    (lambda a: {**a, "block_size": 3}, ValueError, "block_size: expected a power-of-two"),
    (lambda a: {**a, "backend": "cuda"}, ValueError, "backend: expected None"),
])
def test_bad_inputs_fail_at_plan_time(change, error, match):
    q, k, v, seq_lens, idx, count = problem()
    args = {"q": q[0], "k_cache": k[0], "v_cache": v[0], "seq_lens": seq_lens, "idx": idx, "count": count,
            "block_size": 4, "backend": "torch"}
    with pytest.raises(error, match=match):
        VerifyPlan(**change(args))


def test_bad_out_of_run():
    q, k, v, seq_lens, idx, count = problem()
    plan = VerifyPlan(q[0], k[0], v[0], seq_lens, idx, count, block_size=4)
    with pytest.raises(ValueError, match="out: expected a float32 tensor"):
        plan.run(q[0], k[0], v[0], out=torch.empty(B, HKV * G, T, D, dtype=torch.float16))
