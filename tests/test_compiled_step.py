"""The speculative step as one torch.compile(fullgraph=True) graph on CPU: the same tokens as the eager
step for every policy (AOT-eager backend: the capture and functionalisation, not Inductor's codegen)."""
import pytest
import torch

from dustin_kernels import testbed
from dustin_kernels.policies import make_policy
from dustin_kernels.speculative import Sampler, generate

SPEC = testbed.TestbedSpec()


@pytest.fixture(scope="module")
def pair():
    return testbed.models(SPEC)


@pytest.mark.parametrize("name, every", [("plain", 1), ("dense", 1), ("dustin", 1), ("dustin", 2), ("quest", 1)])
def test_compiled_generation_equals_eager(pair, name, every):
    draft, target = pair
    prompts = [testbed.prompt(SPEC, n, seed=s)[0] for s, n in ((0, 500), (1, 430))]
    policy = make_policy("dense" if name == "plain" else name, testbed.profile(SPEC), budget=64, estimate_every=every)
    kw = dict(max_new_tokens=8, eos_ids=(), policy=policy, gamma=0 if name == "plain" else 4)
    model = None if name == "plain" else draft
    eager = generate(model, target, prompts, **kw)
    torch._dynamo.reset()
    compiled = generate(model, target, prompts, compile="aot_eager", **kw)
    assert compiled.tokens == eager.tokens and compiled.stats.accept_hist == eager.stats.accept_hist
    assert compiled.stats.kv_read_bytes == eager.stats.kv_read_bytes
    assert compiled.stats.score_bytes == eager.stats.score_bytes


def test_compile_refuses_sampling_and_fidelity(pair):
    draft, target = pair
    with pytest.raises(ValueError, match="compile: the compiled step is greedy"):
        generate(draft, target, [[1, 5, 6]], compile=True, sampler=Sampler(1.0))
    with pytest.raises(ValueError, match="compile"):
        generate(draft, target, [[1, 5, 6]], compile=True, fidelity=True)
