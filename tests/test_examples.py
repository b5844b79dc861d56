"""The examples in examples/ run as the README shows them (the vLLM one in tests/test_vllm_plugin.py)."""
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_ops_pytorch_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU tensors: the PyTorch backend
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ops_pytorch.py"), "--context", "1000"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "each target layer read 512 of 1000 history tokens" in proc.stdout and "max |sparse - dense|" in proc.stdout
