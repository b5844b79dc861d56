"""Smoke test of tools/bench_kernels.py: a minuscule grid on CPU, checks the result files (no timing asserts)."""
import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(bench, out: Path, *extra: str) -> tuple[dict, list[dict], list[dict]]:
    bench.main(["--preset", "cpu-small", "--device", "cpu", "--dtype", "fp32", "--context", "100",
                "--budget", "32", "--repeats", "1", "--out", str(out), *extra])
    (json_path,) = out.glob("*.json")
    (csv_path,) = out.glob("*.csv")
    data = json.loads(json_path.read_text())
    with csv_path.open() as f:
        return data["meta"], data["rows"], list(csv.DictReader(f))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bench_writes_rows_with_positive_ratios(bench, tmp_path, backend):
    batches = ["1", "2"] if backend == "torch" else ["1"]  # the interpreter is slow: one sequence
    meta, rows, csv_rows = run_tool(bench, tmp_path, "--backend", backend, "--batch", *batches)

    for key in ("device", "torch", "triton", "commit", "date", "command", "floors"):
        assert meta[key]
    assert meta["copy_gbps"] > 0 and meta["backend"] == backend
    assert set(meta["skipped"]) == {"flash_attn", "flashinfer"}  # CUDA only
    assert all(list(row) == list(bench.FIELDS) for row in rows)
    assert list(csv_rows[0]) == list(bench.FIELDS) and len(csv_rows) == len(rows)

    kinds = {(r["kernel"], r["provider"]) for r in rows}
    assert kinds == {("dense_verify", backend), ("dense_verify", "sdpa"), ("attention_scores_layers[draft]", backend),
                     ("attention_scores[target]", backend), ("select_tokens", backend), ("sparse_verify", backend)}
    for r in rows:
        assert r["bytes"] > 0 and 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"] and r["gbps"] > 0
    sparse = [r for r in rows if r["kernel"] == "sparse_verify"]
    assert len(sparse) == len(batches)
    for r in sparse:
        for key in ("speedup_vs_dense", "speedup_vs_sdpa", "ideal_ratio", "floor_ratio", "selection_ms",
                    "selection_share"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
            assert float(next(c for c in csv_rows if c["kernel"] == "sparse_verify")[key]) > 0
        assert r["speedup_vs_flash_attn"] is None and r["speedup_vs_flashinfer"] is None
    sdpa = next(r for r in rows if r["provider"] == "sdpa")
    assert sdpa["max_abs_diff"] < 1e-4  # the SDPA baseline computes the same attention as dense_verify


def test_bench_floors(bench, tmp_path):
    """The bytes floors of one known case: cpu-small (Hq 8, Hkv 2, D 64), fp32, T 5, context 100, budget 32."""
    _, rows, _ = run_tool(bench, tmp_path, "--backend", "torch", "--batch", "1")
    by_kernel = {(r["kernel"], r["provider"]): r for r in rows}
    q_and_out = 2 * 8 * 5 * 64 * 4
    kv_row = 2 * 2 * 64 * 4  # K and V of one token, every KV head
    dense = q_and_out + 105 * kv_row + 4
    sparse = q_and_out + (32 + 5) * kv_row + 4 + 4 * (32 + 1)  # + idx entries and count
    assert by_kernel["dense_verify", "torch"]["bytes"] == by_kernel["dense_verify", "sdpa"]["bytes"] == dense
    assert by_kernel["sparse_verify", "torch"]["bytes"] == sparse
    assert by_kernel["sparse_verify", "torch"]["ideal_ratio"] == pytest.approx(100 / 32)
    # target estimation: heads 0, 2, 4, 6 use KV heads 0 and 1; 101 keys read once; one row each
    assert by_kernel["attention_scores[target]", "torch"]["bytes"] == (
        101 * 2 * 64 * 4 + 4 * 64 * 4 + 4 * 112 + 4)


def test_bench_rejects_a_budget_below_sink_and_recent(bench, tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--budget", "16", "--out", str(tmp_path)])


def test_results_go_outside_the_repository_by_default(bench, monkeypatch, tmp_path):
    """tools/results holds tracked results: a plain run writes to the cache folder instead."""
    monkeypatch.setenv("DUSTIN_CACHE_DIR", str(tmp_path))
    assert bench.parse_args([]).out == tmp_path / "bench"
    monkeypatch.delenv("DUSTIN_CACHE_DIR")
    assert bench.parse_args([]).out == Path.home() / ".cache" / "dustin_kernels" / "bench"
