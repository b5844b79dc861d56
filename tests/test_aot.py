"""Ahead-of-time compile for sm_80 / sm_90 on a machine without a GPU; default configs must not spill."""
import json
import os
import subprocess
import sys

import pytest

from dustin_kernels.aot import FAMILIES


@pytest.mark.parametrize("kernel", list(FAMILIES))
def test_default_configs_compile_without_spills(kernel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real GPU code, not the interpreter
    env["DUSTIN_CACHE_DIR"] = str(tmp_path)
    report = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, "-m", "dustin_kernels.aot", kernel, "--quick", "--json", str(report)],
                          env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads(report.read_text())
    assert {r["uri"].split("_")[len(kernel.split("_"))] for r in rows} == {"sm80", "sm90"}
    assert done.returncode == 0, done.stdout + done.stderr
    for r in rows:
        assert not r["error"] and r["spill_bytes"] == 0 and r["registers"] > 0, r
