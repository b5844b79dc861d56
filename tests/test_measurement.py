"""dustin_kernels.measurement: the bytes model against hand counts, the one model behind both the tuner's
`Workload.bytes_moved` and bench_kernels' rows, and the provenance fields on CPU."""
import datetime
import json
import sys
from pathlib import Path

import pytest
import torch

from dustin_kernels.autotune.workloads import Workload
from dustin_kernels.measurement import provenance, scores_bytes, select_bytes, used_kv_heads, verify_bytes
from dustin_kernels.shapes import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_kernels  # noqa: E402

# hand counts: batch 2, Hq 4 over 2 KV heads of 4 (group 2), T 3, fp16 (2 bytes), history 10 per sequence
B, HQ, HKV, D, T, FP16 = 2, 4, 2, 4, 3, 2
Q_AND_OUT = 2 * (B * HQ * T * D * FP16)  # q read, the output written: 2 x 192
SEQ_LENS = 4 * B


def test_dense_verify_reads_every_valid_row():
    rows = B * (10 + T)  # 26 positions, K and V of both KV heads: 26 * 2 * 2 * 4 * 2 = 832 bytes
    assert verify_bytes(B, HQ, HKV, D, T, rows, FP16) == Q_AND_OUT + 832 + SEQ_LENS == 1224


def test_sparse_verify_adds_the_used_idx_entries_and_count():
    rows = 6 + B * T  # 6 selected history positions + the windows: 12 * 2 * 2 * 4 * 2 = 384 bytes
    assert verify_bytes(B, HQ, HKV, D, T, rows, FP16, index_entries=5) == Q_AND_OUT + 384 + SEQ_LENS + 4 * 5 + 4 * B
    # no entry used still reads count: a sparse call is not a dense one
    dense = verify_bytes(B, HQ, HKV, D, T, rows, FP16)
    assert verify_bytes(B, HQ, HKV, D, T, rows, FP16, index_entries=0) == dense + 4 * B


@pytest.mark.parametrize("heads, kv_heads", [((0, 1), 1), ((0, 2), 2), ((0, 1, 3), 2)])
def test_used_kv_heads(heads, kv_heads):
    assert used_kv_heads(heads, HQ // HKV) == kv_heads


def test_attention_scores_reads_the_used_kv_heads_once():
    # q-heads 0 and 1 share KV head 0; one query row; 11 keys per sequence; output [2, 4] float32
    k, q, out = 22 * 1 * D * FP16, B * 2 * 1 * D * FP16, 4 * B * 4
    assert scores_bytes(B, 2, 1, D, 1, 22, 4, FP16) == k + q + out + SEQ_LENS == 248


def test_attention_scores_layers_reads_each_layer_and_its_lse():
    # 3 layers of T rows on q-heads 0 and 1, the rows' lse given; seq_lens and the output once
    per_layer = 26 * D * FP16 + B * 2 * T * D * FP16 + 4 * B * 2 * T  # K 208 + q 96 + lse 48
    assert scores_bytes(B, 2, 1, D, T, 26, 4, FP16, layers=3, lse=True) == 3 * per_layer + 4 * B * 4 + SEQ_LENS == 1096
    assert scores_bytes(B, 2, 1, D, T, 26, 4, FP16, lse=True) - scores_bytes(B, 2, 1, D, T, 26, 4, FP16) == 48


def test_select_tokens_reads_the_history_scores_and_writes_idx_and_count():
    # 5 history blocks per sequence, a budget of 4 blocks
    assert select_bytes(B, B * 5, 4) == 2 * 4 * B * 5 + SEQ_LENS + 4 * B * 4 + 4 * B == 128


def test_workload_and_bench_kernels_count_the_same_bytes(tmp_path):
    """One bench_kernels run whose every row has a tuner workload of the same op and shape: cpu-small, fp32,
    T 5, blocks of 16, context 107 (the bench's K buffer, rounded up to 16 positions, then holds exactly
    context + T, as the workload's), budget 20 blocks (more than the 7 history blocks: all are read)."""
    bench_kernels.main(["--preset", "cpu-small", "--device", "cpu", "--dtype", "fp32", "--backend", "torch",
                        "--batch", "2", "--context", "107", "--budget", "320", "--block-size", "16", "--repeats", "1",
                        "--out", str(tmp_path)])
    rows = {r["kernel"]: r["bytes"] for r in json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
            if r["provider"] == "torch"}
    target, draft = PRESETS["cpu-small"], PRESETS["qwen2.5-0.5b"]

    def workload(name, shape):
        return Workload(name, shape.q_heads, shape.kv_heads, shape.head_dim, "fp32", window=5, block_size=16,
                        batch=2, context=107, budget=20, heads=4).bytes_moved()

    assert rows == {"dense_verify": workload("dense", target), "sparse_verify": workload("sparse", target),
                    "select_tokens": workload("select", target),
                    "attention_scores[target]": workload("estimate", target),
                    "attention_scores_layers[draft]": workload("lookahead", draft)}


def test_provenance_on_cpu():
    meta = provenance(torch.device("cpu"), ["tools/some_tool.py", "--out", "a dir"])
    assert meta["device"] and meta["device_type"] == "cpu" and meta["threads"] == torch.get_num_threads()
    assert "capability" not in meta and "cuda" not in meta
    assert meta["torch"] == torch.__version__ and meta["triton"] and meta["version"] and meta["commit"]
    assert meta["command"] == "python tools/some_tool.py --out 'a dir'"
    assert datetime.datetime.fromisoformat(meta["date"]).utcoffset() == datetime.timedelta(0)
    assert meta["host"] and meta["loadavg_1min"] >= 0
