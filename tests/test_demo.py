"""The kernel-level demo: the selection keeps the planted attention mass that streaming loses."""
from dustin_kernels import demo


def test_dustin_keeps_the_mass_streaming_loses(capsys):
    rows = {r["policy"]: r for r in demo.run(batch=2, context=1024, budget=64, m=16, repeats=3)}
    assert rows["dustin"]["history_read"] == rows["streaming"]["history_read"] == 2 * 64
    assert rows["dustin"]["kv_mib"] < rows["dense"]["kv_mib"] / 8
    assert rows["dustin"]["mass_kept"] > 0.9 > rows["streaming"]["mass_kept"]
    assert rows["dustin"]["max_abs_err"] < rows["streaming"]["max_abs_err"]
    for r in rows.values():  # medians with their spread, not one sample
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["select_ms_p20"] <= r["select_ms"] <= r["select_ms_p80"]
    demo.main(["--context", "512", "--budget", "64", "--m", "16", "--repeats", "3"])
    out = capsys.readouterr().out
    assert "Dustin reads" in out and "median of 3 calls after a warm-up [p20 - p80]" in out
