"""Policies layer by layer: Dustin's refinement at the target's retrieval layer and Quest's page bounds,
against literal recomputations."""
import pytest
import torch

from dustin_kernels import ref, testbed
from dustin_kernels.policies import Dustin, Quest, RetrievalProfile, VerifyContext, make_policy, page_bounds
from dustin_kernels.speculative import speculative_step, start
from test_speculative import draft_window, layer_skip_draft, tiny


def test_refine_switches_to_the_window_queries_selection_at_the_retrieval_layer():
    target = tiny(layers=4)
    draft = layer_skip_draft(target)
    policy = make_policy("dustin", RetrievalProfile({1: (0, 3)}, 2, (1, 2)), budget=10, m=3, sink=2, recent=3)
    prompts = [list(range(3, 40)), list(range(10, 33))]
    dc, tc, state = start(draft, target, prompts, 64, policy)
    lens, T = state.lens, 4
    window = torch.cat([state.pending[:, None], torch.randint(3, 40, (2, T - 1))], 1)
    ctx = VerifyContext(lens, T, *draft_window(draft, dc, state, T, 1), dc, state.target_queries, tc)
    attention = policy.attention(ctx)
    _, captured = target(window, tc, lens, attend=attention, capture=[2])
    s_draft = ref.attention_scores(ctx.draft_queries[1], dc.k[1], lens + T, heads=(0, 3))
    first = ref.select_tokens(s_draft, None, lens + T, 10, 10, 2, 3, window=T)  # the draft fills the budget
    s_window = ref.attention_scores(captured[2], tc.k[2], lens + T, heads=(1, 2))
    refined = ref.select_tokens(s_draft, s_window, lens + T, 10, 3, 2, 3, window=T)
    assert attention.selection[0].tolist() == refined[0].tolist()
    assert refined[0].tolist() != first[0].tolist()  # the refinement changed something
    assert [r.tolist() for r in attention.read] == [[10, 10]] * 4  # every layer reads the budget


def test_quest_page_bounds_are_upper_bounds_and_match_a_literal_loop():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, N, page = 2, 4, 2, 3, 8, 45, 16
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    lens = torch.tensor([40, 17])
    k[1, :, 17:] = float("nan")  # stale cache entries past the history never reach a bound
    got = page_bounds(q, k, lens, page)
    want = torch.zeros(B, 3, dtype=torch.float64)
    for b in range(B):
        pages = -(-int(lens[b]) // page)
        for h in range(Hq):
            for t in range(T):
                bounds = []
                for p in range(pages):
                    keys = k[b, h // (Hq // Hkv), p * page:min((p + 1) * page, int(lens[b]))].double()
                    qd = q[b, h, t].double()
                    bound = torch.maximum(qd * keys.max(0).values, qd * keys.min(0).values).sum() / D ** 0.5
                    assert bound >= (keys @ qd).max() / D ** 0.5 - 1e-9  # an upper bound of q.k on the page
                    bounds.append(bound)
                want[b, :pages] += torch.softmax(torch.stack(bounds), 0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_quest_selects_pages_in_every_layer():
    target = tiny(layers=3)
    draft = layer_skip_draft(target)
    policy = make_policy("quest", budget=32)
    assert isinstance(policy, Quest) and policy.budget == 2 and policy.block_size == 16
    prompts = [list(range(3, 40)) * 2, list(range(10, 33))]
    dc, tc, state = start(draft, target, prompts, 128, policy)
    ctx = VerifyContext(state.lens, 3, {}, {}, dc, state.target_queries, tc)
    attention = policy.attention(ctx)
    target(torch.randint(3, 40, (2, 3)), tc, state.lens, attend=attention)
    assert len(attention.read) == 3
    for read in attention.read:  # 2 pages of 16 (one may be the last, partial page), never more
        assert (read <= 32).all() and (read > 0).all()
    assert policy.score_bytes(draft, target, state.lens, 3, torch.ones(2, dtype=torch.bool)) > 0
    with pytest.raises(ValueError, match="budget"):
        Quest(0)


@pytest.mark.parametrize("name", ["dustin", "dustin-paper"])
def test_reestimation_reuses_the_last_estimate_between_estimating_steps(name):
    spec = testbed.TestbedSpec()
    draft, target = testbed.models(spec)
    profile = testbed.profile(spec)
    policy = make_policy(name, profile, budget=48, estimate_every=3)
    assert [policy.estimates(step) for step in range(7)] == [True, False, False, True, False, False, True]
    prompts = [testbed.prompt(spec, n, seed=s)[0] for s, n in ((0, 400), (1, 333))]
    dc, tc, state = start(draft, target, prompts, 512, policy)
    step = speculative_step(draft, target, dc, tc, state, policy, gamma=3)  # estimates
    estimate = step.state.target_scores
    assert estimate is not None and estimate.shape == (2, 512)
    state = step.state
    state.estimate = False
    calls = []
    original = policy._select

    def spy(s_draft, s_target, seq_lens, window):
        selection = original(s_draft, s_target, seq_lens, window)
        calls.append((s_draft, s_target, seq_lens.clone(), selection))
        return selection

    object.__setattr__(policy, "_select", spy)  # a frozen dataclass: the spy lives on the instance
    lens = state.lens.clone()
    step = speculative_step(draft, target, dc, tc, state, policy, gamma=3)
    assert step.state.target_scores is estimate  # kept for the next reusing step, not re-estimated
    assert len(calls) == 1  # one selection for every layer (no refinement), from the last estimate
    (s_draft, s_target, seq_lens, selection), = calls
    assert s_target is estimate and s_draft is not None and seq_lens.tolist() == (lens + 4).tolist()
    want = ref.select_tokens(s_draft, estimate, lens + 4, 48, policy.m, 4, 16, window=4)
    assert selection[0].tolist() == want[0].tolist() and selection[1].tolist() == want[1].tolist()
    active = torch.ones(2, dtype=torch.bool)
    draft_only = make_policy("draft-only", profile, budget=48)
    assert policy.score_bytes(draft, target, lens, 4, active, estimate=False) == \
        draft_only.score_bytes(draft, target, lens, 4, active) < policy.score_bytes(draft, target, lens, 4, active)


def test_reestimation_arguments():
    profile = RetrievalProfile({1: (0,)}, 2, (1,))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="estimate_every"):
            make_policy("dustin", profile, budget=64, estimate_every=bad)
    for name in ("dense", "streaming", "quest", "draft-only"):
        with pytest.raises(ValueError, match=f"estimate_every: policy '{name}' has no target signal"):
            make_policy(name, profile, budget=64, estimate_every=2)
    assert isinstance(make_policy("target-only", profile, budget=64, estimate_every=4), Dustin)



def test_draft_lookahead_sums_every_retrieval_layer_beyond_one_launch():
    """More draft retrieval layers than one attention_scores_layers launch takes (8): S_draft is still the
    sum over all of them of the float64 reference's scores."""
    target = tiny(layers=10)
    heads = {layer: (layer % 4, 3 - layer % 4) for layer in range(10)}
    policy = make_policy("draft-only", RetrievalProfile(heads, 1, (0,)), budget=10, m=3, sink=2, recent=3)
    dc, tc, state = start(target, target, [list(range(3, 40)), list(range(10, 33))], 64, policy)
    queries, lses = {}, {}
    for layer in heads:  # the self-draft's passes, capturing every layer
        q, lse = draft_window(target, dc, state, 3, layer)
        queries |= q
        lses |= lse
    ctx = VerifyContext(state.lens, 3, queries, lses, dc, state.target_queries, tc)
    want = sum(ref.attention_scores(queries[layer], dc.k[layer], state.lens + 3, heads=h) for layer, h in heads.items())
    torch.testing.assert_close(policy.draft_scores(ctx).double(), want, atol=1e-5, rtol=1e-5)
