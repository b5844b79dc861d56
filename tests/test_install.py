"""The light install for engines: the ops (both backends) run with only torch, triton, jinja2 and filelock;
the tuner's and the models' dependencies are never imported by them."""
import os
import subprocess
import sys

OPTIONAL = ("optuna", "jsonschema", "tokenizers", "safetensors", "transformers", "matplotlib")

SCRIPT = f"""
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError("optional dependency imported: " + name)

sys.meta_path.insert(0, Refuse())
import torch
import dustin_kernels as dk

for backend in ("torch", "triton"):  # triton: the interpreter, TRITON_INTERPRET=1
    q, k = torch.randn(2, 4, 3, 16), torch.randn(2, 2, 40, 16)
    seq_lens = torch.tensor([40, 25], dtype=torch.int32)
    s = dk.attention_scores(q, k, seq_lens, heads=[0, 3], backend=backend)
    idx, count = dk.select_tokens(s, None, seq_lens, budget=24, m=4, window=3, backend=backend)
    out = dk.sparse_verify(q, k, k, seq_lens, idx, count, backend=backend)
    dense = dk.dense_verify(q, k, k, seq_lens, backend=backend)
    pages = k.reshape(2, 2, 5, 8, 16).transpose(1, 2).reshape(10, 2, 8, 16)
    table = torch.arange(10, dtype=torch.int32).view(2, 5)
    paged = dk.sparse_verify_paged(q, pages, pages, table, seq_lens, idx, count, backend=backend)
    assert torch.allclose(paged, out, atol=1e-5)
print("ok")
"""


def test_the_ops_never_import_optional_dependencies():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
