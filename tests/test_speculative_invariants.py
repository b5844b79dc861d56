"""Invariants of the speculative driver that its other tests leave open: the bonus token drawn when every
draft is accepted comes from the target's distribution after the last draft, and a step leaves a
finished (inactive) sequence exactly as it was."""
import pytest
import torch

from dustin_kernels.models import ModelConfig, Transformer, init_random
from dustin_kernels.policies import Dense, Dustin
from dustin_kernels.speculative import Sampler, accept_sampling, speculative_step, start

CHI2_3DOF_P0005 = 17.73  # chi-square critical value, 3 degrees of freedom, p = 0.0005


def test_bonus_token_after_all_drafts_accepted_follows_the_last_target_distribution():
    """draft probs == target probs at the gamma drafted positions: every draft is accepted (u * q < p = q),
    and the bonus token must follow p_{gamma+1}, made far from the drafted positions' distributions."""
    g = torch.Generator().manual_seed(0)
    n, gamma = 20000, 3
    drafted = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    bonus = torch.tensor([0.6, 0.05, 0.3, 0.05])
    draft_probs = drafted.expand(n, gamma, 4)
    target_probs = torch.cat([drafted, bonus[None]]).expand(n, gamma + 1, 4)
    drafts = torch.multinomial(draft_probs.reshape(-1, 4), 1, generator=g).reshape(n, gamma)
    accepted, nxt = accept_sampling(drafts, draft_probs, target_probs, torch.rand(n, gamma + 1, generator=g))
    assert (accepted == gamma).all()
    counts = torch.bincount(nxt, minlength=4).double()
    expected = bonus.double() * n
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_3DOF_P0005, counts.tolist()


def _tiny(layers, seed):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                      num_kv_heads=2, head_dim=8, family="qwen2", qkv_bias=True)
    return init_random(Transformer(cfg), seed, 0.3).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampling"])
@pytest.mark.parametrize("parked", [False, True], ids=["in-place", "parked-at-0"])
@pytest.mark.parametrize("policy", [Dense(), Dustin({0: (0, 1)}, {1: (0, 2)}, budget=4, m=1, sink=1, recent=1)],
                         ids=["dense", "dustin"])  # dustin: the driver keeps the target's queries
def test_a_step_leaves_an_inactive_sequence_untouched(policy, temperature, parked):
    target, draft = _tiny(2, 0), _tiny(1, 1)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10, 11, 12, 13, 14, 15], [13, 14, 15, 16, 17, 18, 19, 20]]
    draft_cache, target_cache, state = start(draft, target, prompts, 32, policy)
    state.active = torch.tensor([True, False, True])
    if parked:  # what generate does with a finished sequence
        state.lens = torch.where(state.active, state.lens, 0).to(torch.int32)
    before = {"lens": state.lens.clone(), "pending": state.pending.clone(),
              "queries": {k: v.clone() for k, v in state.target_queries.items()}}
    committed = int(state.lens[1])
    caches = [c[1, :, :committed].clone() for cache in (draft_cache, target_cache) for c in cache.k + cache.v]
    sampler = Sampler(temperature, generator=torch.Generator().manual_seed(1))
    step = speculative_step(draft, target, draft_cache, target_cache, state, policy, sampler, gamma=3)
    new = step.state
    assert step.counts[1] == 0 and (step.counts[[0, 2]] >= 1).all()
    assert new.lens[1] == before["lens"][1] and new.pending[1] == before["pending"][1]
    assert not new.active[1] and new.active[[0, 2]].all()
    assert set(new.target_queries) == set(policy.target_heads)
    for layer, q in new.target_queries.items():
        assert torch.equal(q[1], before["queries"][layer][1])
    after = [c[1, :, :committed] for cache in (draft_cache, target_cache) for c in cache.k + cache.v]
    assert all(torch.equal(a, b) for a, b in zip(after, caches))  # the committed cache entries
