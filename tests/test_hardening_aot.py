"""`python -m dustin_kernels.aot`: a known spill (aot.KNOWN_SPILLS) is reported but does not fail the run;
any other spill or compile error does. Compiles are stood in for (the full report takes minutes)."""
import json

import pytest

from dustin_kernels import aot
from dustin_kernels.family import OpFamily
from dustin_kernels.spec import Launch

KNOWN = ("sparse_verify_sm80_bf16_d256_g8_t5_bs1", "sparse_verify_fwd")  # a stand-in known spill


def fake_report(monkeypatch, results):
    """aot.main over one stand-in spec whose check returns `results` (uri, function, spill, error)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main drops it; restored for the later tests
    monkeypatch.setattr(aot, "KNOWN_SPILLS", {KNOWN: "head dim 256 spills on sm80 (a stand-in reason)"})
    stand_in = OpFamily("sparse_verify", launch=None, default_config=lambda launch: {"BLOCK_N": 16},
                        aot_launches=None, aot_kernels=None)
    monkeypatch.setattr(aot, "launches", lambda kernels, archs, limit: [(stand_in, Launch(None, 16, 32768))])
    monkeypatch.setattr(aot, "check", lambda spec, config, kernels: [
        aot.AotResult(uri, fn, config, 255, spill, 1024, error) for uri, fn, spill, error in results])


@pytest.mark.parametrize("results, status", [
    ([(*KNOWN, 640, "")], 0),
    ([(*KNOWN, 640, ""), ("sparse_verify_sm90_bf16_d64_g4_t5_bs1", "sparse_verify_fwd", 8, "")], 1),
    ([(*KNOWN, 0, "CompilationError: out of resources")], 1),
    ([(KNOWN[0], "another_kernel", 16, "")], 1),  # known for its forward kernel only
], ids=["known-spill", "known-and-unknown", "known-spec-fails-to-compile", "other-function"])
def test_only_known_spills_pass(monkeypatch, capsys, tmp_path, results, status):
    fake_report(monkeypatch, results)
    assert aot.main(["--json", str(tmp_path / "r.json")]) == status
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("[1/1]")  # progress, one row as each spec compiles
    rows = json.loads((tmp_path / "r.json").read_text())
    known = [r for r in rows if r["known_spill"]]
    assert len(known) == (status == 0 or len(results) == 2)
    if known:
        assert "SPILLS (known: head dim 256" in out and "1 known spills (not failures)" in out
