"""tools/eval_retrieval.py on a tiny sweep: the result files agree with each other, dense retrieves every
planted value and StreamingLLM does not; bad arguments exit 2 naming the argument. No timing asserts."""
import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_retrieval as tool  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval")
    assert tool.main(["--out", str(out), "--contexts", "600", "--budgets", "32", "64", "--policies", "dense",
                      "dustin", "streaming", "--estimate-every", "1", "2", "--prompts", "2", "--device", "cpu"]) == 0
    return out


def test_files_agree(results):
    data = json.loads((results / "retrieval.json").read_text())
    with (results / "retrieval.csv").open() as f:
        table = list(csv.DictReader(f))
    rows, meta = data["rows"], data["meta"]
    for key in ("device", "torch", "commit", "date", "command", "testbed", "run_s"):
        assert meta[key] not in (None, ""), key
    assert meta["testbed"]["max_positions"] >= 600 + 8 + 4
    assert [(r["context"], r["budget"], r["policy"], r["estimate_every"]) for r in rows] == [
        (600, None, "dense", 1), (600, 32, "dustin", 1), (600, 32, "dustin", 2), (600, 32, "streaming", 1),
        (600, 64, "dustin", 1), (600, 64, "dustin", 2), (600, 64, "streaming", 1)]
    assert list(table[0]) == list(tool.FIELDS) and len(table) == len(rows)
    for row, line in zip(rows, table):
        assert list(row) == list(tool.FIELDS)
        for key in tool.FIELDS:
            if row[key] is None:
                assert line[key] == "", key
            elif isinstance(row[key], str):
                assert line[key] == row[key]
            else:
                assert float(line[key]) == pytest.approx(row[key]), key
        assert 0 <= row["recall"] <= 1 and 1 <= row["mean_accept"] <= 5 and 0 < row["kv_fraction"] <= 1.0 + 1e-9
        assert row["prompts"] == 2
        sparse = row["policy"] != "dense"
        assert (row["mass_kept"] is not None) == sparse and (row["greedy_agreement"] is not None) == sparse
        assert not sparse or 0 < row["mass_kept"] < 1
    for name in ("retrieval.png", "mass_kept.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_and_dustin_retrieve_streaming_does_not(results):
    rows = json.loads((results / "retrieval.json").read_text())["rows"]
    (dense,) = [r for r in rows if r["policy"] == "dense"]
    assert dense["recall"] == 1.0 and dense["kv_fraction"] == 1.0
    for r in rows:
        if r["policy"] == "streaming":  # the needles lie before the last budget - 4 tokens
            assert r["recall"] < dense["recall"]
        if r["policy"] == "dustin":  # the testbed's own retrieval heads find the needle
            assert r["recall"] == dense["recall"] and r["kv_fraction"] < 1


@pytest.mark.parametrize("argv, named", [
    (["--contexts", "600"], "--out"),
    (["--policies", "dense", "lsh"], "--policies"),
    (["--budgets", "16", "64"], "--budgets: 16 does not suit policy dustin"),
    (["--policies", "dense", "streaming", "dustin-paper", "--budgets", "8"],
     "--budgets: 8 does not suit policy dustin-paper"),
    (["--contexts", "40", "600"], "--contexts: 40"),
    (["--prompts", "0"], "--prompts"),
    (["--estimate-every", "0"], "--estimate-every"),
    (["--contexts", "600", "--values", "17"], "--contexts: 600 tokens (--values 17)"),
    (["--layers", "1"], "--layers"),
    (["--device", "tpu0"], "--device"),
    (["--profile", "/no/such/profile.json"], "--profile"),
], ids=["no-out", "unknown-policy", "small-budget", "small-budget-paper", "short-context", "no-prompts",
        "no-estimates", "too-many-values",
        "one-layer", "bad-device", "missing-profile"])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, named):
    out = [] if named == "--out" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        tool.main([*out, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert named in err[-1] and not err[-1].startswith("usage")
    assert not (tmp_path / "out").exists()  # nothing written before the arguments are checked
