"""Policies layer by layer: Dustin's refinement at the target's retrieval layer and Quest's page bounds,
against literal recomputations."""
import pytest
import torch

from dustin_kernels import ref
from dustin_kernels.policies import Quest, RetrievalProfile, VerifyContext, make_policy, page_bounds
from dustin_kernels.speculative import start
from test_speculative import layer_skip_draft, tiny


def test_refine_switches_to_the_window_queries_selection_at_the_retrieval_layer():
    target = tiny(layers=4)
    draft = layer_skip_draft(target)
    policy = make_policy("dustin", RetrievalProfile({1: (0, 3)}, 2, (1, 2)), budget=10, m=3, sink=2, recent=3)
    prompts = [list(range(3, 40)), list(range(10, 33))]
    dc, tc, state = start(draft, target, prompts, 64, policy)
    lens, T = state.lens, 4
    token, queries = state.pending[:, None], []
    for i in range(T):
        hidden, q = draft(token, dc, lens + i, capture=[1])
        queries.append(q[1])
        token = draft.logits(hidden[:, -1]).argmax(-1, keepdim=True)
    window = torch.cat([state.pending[:, None], torch.randint(3, 40, (2, T - 1))], 1)
    ctx = VerifyContext(lens, T, {1: torch.cat(queries, 2)}, dc, state.target_queries, tc)
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
    ctx = VerifyContext(state.lens, 3, {}, dc, state.target_queries, tc)
    attention = policy.attention(ctx)
    target(torch.randint(3, 40, (2, 3)), tc, state.lens, attend=attention)
    assert len(attention.read) == 3
    for read in attention.read:  # 2 pages of 16 (one may be the last, partial page), never more
        assert (read <= 32).all() and (read > 0).all()
    assert policy.score_bytes(draft, target, state.lens, 3, torch.ones(2, dtype=torch.bool)) > 0
    with pytest.raises(ValueError, match="budget"):
        Quest(0)
