"""sparse_verify compiled for sm_90 without a GPU: num_stages sets the depth of the K/V ring (the software
pipeliner keeps num_stages - 1 tiles in flight; 2 and 4 stages compared), for token and block indices and
the paged cache. A K/V address that waits on an index load of its own iteration caps the ring at two
buffers whatever num_stages says, and a loop argument carried unchanged drops the ring; this test catches
both."""
import json
import os
import subprocess
import sys

SHARED = """
import json, sys
from dustin_kernels import aot
from dustin_kernels.ops import verify
from dustin_kernels.spec import KernelSpec
rows = []
for uri in sys.argv[1:]:
    spec = KernelSpec.from_uri(uri)
    for stages in (2, 4):
        config = {"BLOCK_N": 64, "num_warps": 4, "num_stages": stages, "num_splits": 1, "HALF_PARTIALS": 0}
        (kernel,) = verify.aot_kernels(spec, config)
        compiled = aot.compile_kernel(kernel, spec.arch)
        rows.append({"uri": uri, "stages": stages, "shared": compiled.metadata.shared,
                     "ttgir": compiled.asm["ttgir"].count("ttg.async_copy_global_to_local")})
json.dump(rows, sys.stdout)
"""
URIS = ["sparse_verify_sm90_bf16_d128_g8_t5_bs1", "sparse_verify_sm90_bf16_d128_g8_t5_bs16",
        "sparse_verify_sm90_bf16_d128_g8_t5_bs1_paged"]


def test_num_stages_sets_the_kv_ring_depth(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real GPU code, not the interpreter
    env["DUSTIN_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", SHARED, *URIS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    tile = 64 * 128 * 2  # one K or V tile of BLOCK_N 64 rows, head dim 128, bf16
    for uri in URIS:
        shared = {r["stages"]: r["shared"] for r in rows if r["uri"] == uri}
        assert shared[4] - shared[2] == 2 * 2 * tile, (uri, shared)  # two more K and two more V tiles
        assert all(r["ttgir"] > 0 for r in rows if r["uri"] == uri)  # K/V arrive by asynchronous copies
