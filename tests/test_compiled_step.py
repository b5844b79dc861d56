"""The speculative step as one torch.compile(fullgraph=True) graph on CPU: the same tokens as the eager
step for every policy (AOT-eager backend: the capture and functionalisation, not Inductor's codegen), under
CUDA graphs' rule that a replay's outputs die when the next call starts, and one graph for any context."""
import weakref

import pytest
import torch
from torch._dynamo import register_backend
from torch._dynamo.utils import counters

from dustin_kernels import testbed
from dustin_kernels.policies import make_policy
from dustin_kernels.speculative import Sampler, generate

SPEC = testbed.TestbedSpec()


LAST_OUTPUTS: list[weakref.ref] = []  # of the last call of any graph `overwritten_outputs` compiled


@register_backend
def overwritten_outputs(graph, example_inputs):
    """CUDA graph trees (`mode="reduce-overhead"`) on CPU: a replay's outputs live in the memory pool that all
    the graphs share, which the next call overwrites; here each call first scribbles over the outputs of the
    call before it, so a driver that carries one of them into the next step (without a clone) computes from
    garbage."""

    def run(*args):
        for ref in LAST_OUTPUTS:
            if (t := ref()) is not None:
                t.fill_(-7 if not t.is_floating_point() else float("nan"))
        out = graph(*args)
        LAST_OUTPUTS[:] = [weakref.ref(t) for t in out if isinstance(t, torch.Tensor)]
        return out

    return run


@pytest.fixture(scope="module")
def pair():
    return testbed.models(SPEC)


def eager_and_compiled(pair, name: str, every: int, backend: str):
    """The generations of two prompts by policy `name` (plain: the target alone), eager and compiled."""
    draft, target = pair
    prompts = [testbed.prompt(SPEC, n, seed=s)[0] for s, n in ((0, 500), (1, 430))]
    policy = make_policy("dense" if name == "plain" else name, testbed.profile(SPEC), budget=64, estimate_every=every)
    kw = dict(max_new_tokens=8, eos_ids=(), policy=policy, gamma=0 if name == "plain" else 4)
    model = None if name == "plain" else draft
    eager = generate(model, target, prompts, **kw)
    torch._dynamo.reset()
    return eager, generate(model, target, prompts, compile=backend, **kw)


@pytest.mark.parametrize("name, every", [("plain", 1), ("dense", 1), ("dustin", 1), ("dustin", 2), ("quest", 1)])
def test_compiled_generation_equals_eager(pair, name, every):
    eager, compiled = eager_and_compiled(pair, name, every, "aot_eager")
    assert compiled.tokens == eager.tokens and compiled.stats.accept_hist == eager.stats.accept_hist
    assert compiled.stats.kv_read_bytes == eager.stats.kv_read_bytes
    assert compiled.stats.score_bytes == eager.stats.score_bytes


@pytest.mark.parametrize("name, every", [("plain", 1), ("dustin", 2)])
def test_carried_state_survives_overwritten_outputs(pair, name, every):
    eager, compiled = eager_and_compiled(pair, name, every, "overwritten_outputs")
    assert compiled.tokens == eager.tokens and compiled.stats.kv_read_bytes == eager.stats.kv_read_bytes


def test_one_graph_for_any_context(pair):
    """The caches' length is a dynamic dimension: new contexts and cache sizes reuse the step's graph."""
    draft, target = pair
    policy = make_policy("dustin", testbed.profile(SPEC), budget=64)
    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    for n, max_len in ((300, 400), (500, 700), (700, 1000)):
        prompts = [testbed.prompt(SPEC, n, seed=s)[0] for s in range(2)]
        kw = dict(max_new_tokens=6, eos_ids=(), policy=policy, max_len=max_len)
        assert generate(draft, target, prompts, compile="aot_eager", **kw).tokens == \
            generate(draft, target, prompts, **kw).tokens
    assert counters["stats"]["unique_graphs"] - graphs == 1


def test_graphs_past_torch_recompile_limit(pair):
    """fullgraph=True fails past Dynamo's limit of graphs per function (8 by default, 1 here): the step sets
    its own, so every policy of one process (`generate --demo --compile`) gets its graph."""
    draft, target = pair
    prompts = [testbed.prompt(SPEC, 300, seed=0)[0]]
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        for name in ("dense", "streaming", "quest"):
            policy = make_policy(name, testbed.profile(SPEC), budget=64)
            generate(draft, target, prompts, max_new_tokens=2, eos_ids=(), policy=policy, compile="aot_eager")


@pytest.mark.parametrize("name", ["plain", "dustin"])
def test_compiled_sampling_equals_eager(pair, name):
    """Sampling (temperature 1, top-p 0.9) compiles too: each step's uniforms are drawn before it, so the
    compiled step gives the eager step's tokens for the same seed."""
    draft, target = pair
    prompts = [testbed.prompt(SPEC, n, seed=s)[0] for s, n in ((0, 500), (1, 430))]
    policy = make_policy("dense" if name == "plain" else name, testbed.profile(SPEC), budget=64)
    kw = dict(max_new_tokens=8, eos_ids=(), policy=policy, gamma=0 if name == "plain" else 4)
    model = None if name == "plain" else draft
    runs = [generate(model, target, prompts, sampler=Sampler(1.0, 0.9, torch.Generator().manual_seed(3)),
                     compile=backend, **kw) for backend in (False, "aot_eager")]
    assert runs[0].tokens == runs[1].tokens and runs[0].stats.accept_hist == runs[1].stats.accept_hist


def test_compile_refuses_fidelity(pair):
    draft, target = pair
    with pytest.raises(ValueError, match="compile: the compiled step is unprobed"):
        generate(draft, target, [[1, 5, 6]], compile=True, fidelity=True)
