"""A perf DB entry outside its kernel's search space never reaches a kernel: the op warns and runs the
default rule (Triton interpreter), with results equal to the float64 reference."""
import pytest
import torch

from dustin_kernels import dense_verify, dispatch, perf_db, ref, sparse_verify
from dustin_kernels.spec import KernelSpec

from test_perf_db import make_doc, make_entry
from test_sparse_verify import assert_close, make_inputs, select


@pytest.mark.parametrize("variant", ["", "dense"])
@pytest.mark.parametrize("bad", [{"num_splits": 0}, {"BLOCK_N": 3}], ids=["splits0", "block3"])
def test_an_invalid_entry_warns_and_the_op_runs_the_default_rule(tmp_path, variant, bad):
    q, k, v, seq_lens = make_inputs([40, 23], hkv=1, group=2, window=2, head_dim=16)
    idx, count = select(seq_lens, 2, 1, width=16)
    spec = KernelSpec("sparse_verify", "interp", "fp32", head_dim=16, group=2, window=2, variant=variant)
    context = k.shape[2] - 2 if variant else idx.shape[1]
    config = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "num_splits": 1, "HALF_PARTIALS": 0, **bad}
    key = perf_db.entry_key(spec.uri(), 2, context, 1)  # sparse_verify's config depends on its KV heads
    perf_db.write(perf_db.path_for(tmp_path, "sparse_verify", "interp", "cpu"),
                  make_doc(entries={key: make_entry(config)}, arch="interp", device="cpu"))
    with dispatch.using(db=tmp_path), pytest.warns(dispatch.PerfDBWarning, match=f"{key} has an invalid config"):
        if variant:
            out = dense_verify(q, k, v, seq_lens, backend="triton")
            expected = ref.dense_attention(q, k, v, seq_lens)
        else:
            out = sparse_verify(q, k, v, seq_lens, idx, count, backend="triton")
            expected = ref.sparse_verify(q, k, v, seq_lens, idx, count)
    assert_close(out, expected, torch.float32)
