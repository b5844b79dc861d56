"""Fidelity probe: its per-layer figures against a float64 computation, and probed generations (same
tokens as unprobed ones; exact figures when the budget holds the whole history)."""
import math

import pytest
import torch

from dustin_kernels import ref, sparse_verify
from dustin_kernels.fidelity import Probe
from dustin_kernels.policies import Dense, RetrievalProfile, StepAttention, make_policy
from dustin_kernels.speculative import generate
from test_speculative import PROMPTS, layer_skip_draft, tiny


def float64_figures(q, k, v, seq_lens, idx, count, active):
    """(mass kept, top-k recall, output error) per active row, from float64 softmax weights."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    kept, recall = [], []
    for b in range(B):
        if not active[b]:
            continue
        n = int(seq_lens[b])
        ctx = n - T
        chosen = [j for j in idx[b, : int(count[b])].tolist() if j < ctx]
        for h in range(Hq):
            logits = k[b, h // G, :n].double() @ q[b, h].double().T / math.sqrt(D)  # [n, T]
            for t in range(T):
                p = torch.softmax(logits[: ctx + t + 1, t], 0)
                mass = float(p[chosen].sum() + p[ctx: ctx + t + 1].sum())
                best = float(p.sort(descending=True).values[: len(chosen) + t + 1].sum())
                kept.append(mass)
                recall.append(mass / best)
    sparse = ref.sparse_verify(q, k, v, seq_lens, idx, count)
    dense = ref.dense_attention(q, k, v, seq_lens)
    error = ((sparse - dense).norm(dim=-1) / dense.norm(dim=-1))[active]
    return torch.tensor(kept), torch.tensor(recall), error.flatten()


def test_probe_figures_match_float64():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, n_max = 3, 4, 2, 3, 16, 40
    q = 2 * torch.randn(B, Hq, T, D, generator=g)
    k, v = 2 * torch.randn(B, Hkv, n_max, D, generator=g), torch.randn(B, Hkv, n_max, D, generator=g)
    seq_lens = torch.tensor([40, 25, 31], dtype=torch.int32)
    idx = torch.full((B, 6), -1, dtype=torch.int32)
    idx[0, :6] = torch.tensor([0, 3, 9, 20, 30, 36])
    idx[1, :4] = torch.tensor([1, 2, 10, 21])
    idx[2, :5] = torch.tensor([0, 5, 6, 7, 27])
    count = torch.tensor([6, 4, 5], dtype=torch.int32)
    active = torch.tensor([True, True, False])  # the last is a finished sequence: not counted
    attention = StepAttention(seq_lens - T, 1, (idx, count))
    probe = Probe()
    probe.begin(attention, active)
    out = probe.attend(q, k, v, seq_lens)
    assert attention.read[0].tolist() == [6, 4, 5]
    torch.testing.assert_close(out, sparse_verify(q, k, v, seq_lens, idx, count))  # the sparse output, unchanged
    kept, recall, error = float64_figures(q, k, v, seq_lens, idx, count, active)
    (layer,) = probe.layers
    got = layer.summary()
    assert got["rows"] == 2 * Hq * T == len(kept)
    assert kept.min() < 0.9 and error.max() > 0.05  # the selection misses mass: the figures are not trivial
    for name, want in [("mass_kept", kept.mean()), ("min_mass_kept", kept.min()), ("topk_recall", recall.mean()),
                       ("output_error", error.mean()), ("max_output_error", error.max())]:
        assert got[name] == pytest.approx(float(want), rel=1e-4, abs=1e-6), name


@pytest.fixture(scope="module")
def models():
    target = tiny()
    return layer_skip_draft(target), target


def test_fidelity_run_has_the_same_tokens_and_is_exact_with_the_whole_history(models):
    draft, target = models
    profile = RetrievalProfile.default(draft.config, target.config)
    whole = make_policy("dustin", profile, budget=64, sink=2, recent=2)  # holds every history here
    probed = generate(draft, target, PROMPTS, max_new_tokens=10, gamma=3, policy=whole, fidelity=True)
    assert probed.tokens == generate(draft, target, PROMPTS, max_new_tokens=10, gamma=3, policy=whole).tokens
    f = probed.stats.fidelity
    assert len(f["per_layer"]) == target.config.num_layers and f["positions"] > 0
    assert f["mass_kept"] == pytest.approx(1, abs=1e-5) and f["topk_recall"] == pytest.approx(1, abs=1e-5)
    assert f["max_output_error"] < 1e-4 and f["greedy_agreement"] == 1.0


@pytest.mark.parametrize("policy", ["dustin", "streaming"])
def test_fidelity_of_a_small_budget(models, policy):
    draft, target = models
    small = make_policy(policy, RetrievalProfile.default(draft.config, target.config), budget=8, sink=2, recent=2)
    probed = generate(draft, target, PROMPTS, max_new_tokens=10, gamma=3, policy=small, fidelity=True)
    assert probed.tokens == generate(draft, target, PROMPTS, max_new_tokens=10, gamma=3, policy=small).tokens
    f = probed.stats.fidelity
    assert 0 < f["min_mass_kept"] <= f["mass_kept"] < 1 and 0 < f["topk_recall"] < 1
    assert f["mass_kept"] <= f["topk_recall"] + 1e-6  # the row's top-k holds at most all of its mass
    assert 0 < f["output_error"] <= f["max_output_error"] and 0 <= f["greedy_agreement"] <= 1


def test_dense_verification_is_not_probed(models):
    draft, target = models
    assert generate(draft, target, PROMPTS, max_new_tokens=4, gamma=3, policy=Dense(), fidelity=True).stats.fidelity \
        is None
