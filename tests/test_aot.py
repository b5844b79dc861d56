"""Ahead-of-time compile for sm_80 / sm_90 on a machine without a GPU; default configs must not spill."""
import json
import os
import subprocess
import sys

import pytest

from dustin_kernels.spec import KERNELS


@pytest.mark.parametrize("kernel", KERNELS)
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


SWITCHES_AOT = """
import json, sys
from dustin_kernels import aot
from dustin_kernels.ops import scores, verify
from dustin_kernels.spec import KernelSpec, Launch
rows = []
for arch in ("sm80", "sm90"):
    for d, g, t, bs in [(128, 1, 1, 1), (64, 2, 5, 1), (128, 4, 5, 16)]:  # estimate, lookahead, blocks
        spec = KernelSpec("attention_scores", arch, "bf16", d, g, t, bs)
        config = {**scores.default_config(Launch(spec, 16, 32768)), "ONE_PASS": 1}
        rows += [r.__dict__ for r in aot.check(spec, config, scores.aot_kernels)]
    for d, g, t in [(128, 8, 5), (64, 7, 5)]:  # the headline verification shapes
        spec = KernelSpec("sparse_verify", arch, "bf16", d, g, t, 1)
        config = {**verify.default_config(Launch(spec, 16, 512, 8)), "HALF_PARTIALS": 1, "num_splits": 2}
        rows += [r.__dict__ for r in aot.check(spec, config, verify.aot_kernels)]
json.dump(rows, sys.stdout)
"""


def test_algorithm_switches_compile_without_spills(tmp_path):
    """attention_scores ONE_PASS and sparse_verify HALF_PARTIALS (not in the default rules yet) for sm80 / sm90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DUSTIN_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", SWITCHES_AOT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 2 * (3 * 2 + 2)  # sparse_verify merges its splits in the one kernel
    for r in rows:
        assert not r["error"] and r["spill_bytes"] == 0 and r["registers"] > 0, r
