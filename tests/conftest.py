"""Quick tier: runs on CPU. Triton kernels run in Triton's interpreter, which must be enabled before
triton is imported anywhere."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DUSTIN_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "dustin"))

import pytest  # noqa: E402
import torch  # noqa: E402

# Per-dtype (atol, rtol) against the float64 reference computed from the same rounded inputs.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


# pytest -n 2 runs two workers on two cores: one torch thread each, or they oversubscribe the machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
