"""tools/bench_e2e.py runs tiny on CPU: rows per policy with a breakdown that adds up, a bytes floor,
plots, and the paper-shape model from the committed H200 timings."""
import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).parent.parent / "tools" / "bench_e2e.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_e2e", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run(tmp_path):
    bench = load()
    assert bench.main(["--out", str(tmp_path), "--contexts", "300", "--batches", "1", "--new-tokens", "8",
                       "--policies", "plain", "dense", "dustin"]) == 0
    result = json.loads((tmp_path / "bench_e2e.json").read_text())
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "dense", "dustin"] and all(r["recall"] == 1.0 for r in rows.values())
    assert rows["plain"]["ms_draft"] < rows["dense"]["ms_draft"] and rows["dustin"]["ms_selection"] > 0
    for r in rows.values():
        assert 0 < r["floor_ms_per_step"] and 0 < r["floor_fraction"] and r["tokens_per_s"] > 0
    assert (tmp_path / "tokens_per_s.png").stat().st_size and (tmp_path / "breakdown.png").stat().st_size
    assert (tmp_path / "bench_e2e.csv").read_text().count("\n") == 4
    paper = result["paper_shape"]
    assert paper["step_ms"]["dustin"] < paper["step_ms"]["dense"] < paper["step_ms"]["plain"] + 20
    assert all(r["dustin_over_dense"] > 1 for r in paper["rows"])


def test_bad_arguments(tmp_path, capsys):
    bench = load()
    for argv in (["--budget", "8"], ["--contexts", "10"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--out", str(tmp_path), *argv])
        assert exc.value.code == 2
