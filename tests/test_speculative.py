"""Speculative decoding: greedy equality with the target's own greedy decoding (dense, and sparse
policies whose budget holds the whole history), rollback by length, EOS / max-new-tokens per
sequence, the rejection-sampling rule (chi-square against the target distribution, and a wrong
residual rule that the same test rejects), policies and profiles, bad inputs."""
import json
import math

import pytest
import torch

from dustin_kernels import speculative
from dustin_kernels.models import ModelConfig, Transformer, causal_attention, init_random
from dustin_kernels.policies import (Dense, DraftAttention, Dustin, RetrievalProfile, Streaming, VerifyContext,
                                     make_policy)
from dustin_kernels.speculative import (Sampler, accept_greedy, accept_sampling, generate, sample, speculative_step,
                                        start)

VOCAB = 48


def tiny(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, vocab=VOCAB, family="qwen2", seed=0, std=0.25):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, qkv_bias=family == "qwen2",
                      family=family)
    return init_random(Transformer(cfg), seed, std).eval()


def layer_skip_draft(target, keep=2):
    """The target's first `keep` layers with its embeddings, norm and head."""
    cfg = ModelConfig(**{**target.config.__dict__, "num_layers": keep})
    draft = Transformer(cfg).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < keep})
    return draft


@pytest.fixture(scope="module")
def target():
    return tiny()


@pytest.fixture(scope="module", params=["layer-skip", "other-shape"])
def draft(request, target):
    if request.param == "layer-skip":
        return layer_skip_draft(target)
    return tiny(layers=2, hidden=32, heads=4, kv_heads=1, head_dim=8, family="llama", seed=1)


PROMPTS = [list(range(3, 3 + 29)), [5, 9, 11], [7] * 12, [40]]


def greedy_reference(model, prompt, n):
    """The target's own greedy tokens, recomputing the whole sequence at every token (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        hidden, _ = model(torch.tensor([seq]), model.new_cache(1, len(seq)), torch.zeros(1, dtype=torch.int32),
                          attend=causal_attention)
        seq.append(int(model.logits(hidden[0, -1]).argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def reference(target):
    return [greedy_reference(target, p, 14) for p in PROMPTS]


@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_dense_equals_target_greedy(target, draft, reference, gamma):
    out = generate(draft, target, PROMPTS, max_new_tokens=14, gamma=gamma, eos_ids=())
    assert out.tokens == reference
    hist = out.stats.accept_hist
    assert len(hist) == gamma + 1 and sum((k + 1) * c for k, c in enumerate(hist)) >= sum(map(len, reference))
    assert out.stats.kv_read_bytes == out.stats.kv_dense_bytes > 0 and out.stats.score_bytes == 0
    stats = out.stats
    assert len(stats.step_s) == len(stats.step_tokens) == stats.steps and sum(stats.step_tokens) == stats.new_tokens
    assert sum(stats.step_s) <= stats.decode_s and all(s > 0 for s in stats.step_s)
    ms, tokens_per_s = stats.steady()
    assert ms == pytest.approx(1e3 * sum(stats.step_s[1:]) / (stats.steps - 1))
    assert tokens_per_s == pytest.approx(sum(stats.step_tokens[1:]) / sum(stats.step_s[1:]))


def test_plain_decoding_equals_target_greedy(target, reference):
    out = generate(None, target, PROMPTS, max_new_tokens=14, gamma=0, eos_ids=())
    assert out.tokens == reference and out.stats.accept_hist == [out.stats.steps * len(PROMPTS)]


@pytest.mark.parametrize("policy", ["dustin", "draft-only", "target-only", "streaming"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_sparse_policy_with_whole_history_budget_equals_target_greedy(target, draft, reference, policy, block_size):
    profile = RetrievalProfile.default(draft.config, target.config)
    pol = make_policy(policy, profile, budget=64 // block_size, m=3, sink=1, recent=2, block_size=block_size)
    out = generate(draft, target, PROMPTS, max_new_tokens=14, gamma=3, policy=pol, eos_ids=())
    assert out.tokens == reference
    assert out.stats.kv_read_bytes == out.stats.kv_dense_bytes
    assert (out.stats.score_bytes > 0) == (policy != "streaming")


@pytest.mark.parametrize("policy", ["dustin", "draft-only", "target-only", "streaming"])
def test_sparse_policy_small_budget_reads_less(target, draft, policy):
    profile = RetrievalProfile({0: (0, 2), 1: (1,)}, 2, (0, 3))
    pol = make_policy(policy, profile, budget=8, m=2, sink=2, recent=3)
    out = generate(draft, target, PROMPTS, max_new_tokens=10, gamma=2, policy=pol, eos_ids=())
    assert [len(t) for t in out.tokens] == [10] * 4
    assert all(0 <= t < VOCAB for seq in out.tokens for t in seq)
    assert out.stats.kv_read_bytes < out.stats.kv_dense_bytes


def draft_window(draft, cache, state, T: int, layer: int) -> tuple[dict, dict]:
    """({layer: queries [B, Hq, T, D]}, {layer: lse float32[B, Hq, T]}) of the draft's greedy passes over a
    window of T tokens from `state.pending`, as speculative_step runs them."""
    token, queries, lses = state.pending[:, None], [], []
    for i in range(T):
        attend = DraftAttention([layer])
        hidden, q = draft(token, cache, state.lens + i, attend=attend, capture=[layer])
        queries.append(q[layer])
        lses.append(attend.lse[layer])
        token = draft.logits(hidden[:, -1]).argmax(-1, keepdim=True)
    return {layer: torch.cat(queries, 2)}, {layer: torch.cat(lses, 2)}


def test_dustin_selection_follows_the_rule(target, draft):
    """One step's selection equals select_tokens on scores recomputed from the captured queries: the
    draft's queries of all T window tokens (pending and the drafts), the target's committed query."""
    from dustin_kernels import ref

    pol = make_policy("dustin-paper", RetrievalProfile({1: (0, 3)}, 1, (2,)), budget=10, m=3, sink=2, recent=3)
    prompts = [list(range(3, 40)), list(range(10, 33))]
    dc, tc, state = start(draft, target, prompts, 64, pol)
    lens = state.lens
    ctx = VerifyContext(lens, 4, *draft_window(draft, dc, state, 4, 1), dc, state.target_queries, tc)
    idx, count = pol.select(ctx)
    s_draft = ref.attention_scores(ctx.draft_queries[1], dc.k[1], lens + 4, heads=(0, 3))
    s_target = ref.attention_scores(state.target_queries[1], tc.k[1], lens, heads=(2,))
    want_idx, want_count = ref.select_tokens(s_draft, s_target, lens + 4, 10, 3, 2, 3, window=4)
    assert count.tolist() == want_count.tolist() == [10, 10]
    assert idx.tolist() == want_idx.tolist()


def test_self_draft_accepts_every_token(target):
    for sampler in (Sampler(), Sampler(1.0, 0.9, torch.Generator().manual_seed(0))):
        out = generate(target, target, PROMPTS, max_new_tokens=12, gamma=3, sampler=sampler, eos_ids=())
        assert out.stats.accept_hist[:-1] == [0, 0, 0] and out.stats.mean_accept == 4.0


def committed(prompt, emitted):
    """Tokens in the caches: the prompt and every emitted token but the last (which is pending)."""
    return (list(prompt) + emitted)[:-1]


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("policy", ["dense", "dustin"])
def test_rollback_leaves_caches_equal_to_recompute(target, draft, sampling, policy):
    """After steps with rejections, both caches hold exactly a fresh prefill of the committed tokens.
    (dustin's budget holds the whole history here: with a smaller one the K/V of layers >= 1 come from
    the sparse verification pass, as Dustin intends, and differ from a dense recompute.)"""
    pol = make_policy(policy, RetrievalProfile.default(draft.config, target.config), budget=64, m=3, sink=2,
                      recent=3)
    sampler = Sampler(1.0, 1.0, torch.Generator().manual_seed(1)) if sampling else Sampler()
    prompts = PROMPTS[:3]
    dc, tc, state = start(draft, target, prompts, 64, pol)
    emitted = [[] for _ in prompts]
    accepted = set()
    for _ in range(5):
        step = speculative_step(draft, target, dc, tc, state, pol, sampler, gamma=3)
        state = step.state
        for b, (toks, n) in enumerate(zip(step.tokens.tolist(), step.counts.tolist())):
            emitted[b] += toks[:n]
            accepted.add(n)
    assert min(accepted) < 4  # drafts were rejected: the caches were rolled back
    for b, prompt in enumerate(prompts):
        seq = committed(prompt, emitted[b])
        assert state.lens[b] == len(seq) and state.pending[b] == emitted[b][-1]
        for model, cache in ((target, tc), (draft, dc)):
            fresh = model.new_cache(1, len(seq))
            _, q = model.prefill(torch.tensor([seq]), torch.tensor([len(seq)]), fresh, capture=pol.target_heads
                                 if model is target else ())
            for layer in range(model.config.num_layers):
                torch.testing.assert_close(cache.k[layer][b, :, : len(seq)], fresh.k[layer][0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[layer][b, :, : len(seq)], fresh.v[layer][0], atol=1e-5, rtol=1e-5)
            if model is target:  # the query of the last committed token, for the next S_target
                for layer, want in q.items():
                    torch.testing.assert_close(state.target_queries[layer][b], want[0], atol=1e-5, rtol=1e-5)


def test_eos_and_max_new_tokens_per_sequence(target, draft, reference):
    eos = reference[0][5]
    out = generate(draft, target, PROMPTS, max_new_tokens=[14, 3, 0, 9], gamma=3, eos_ids=[eos])

    def cut(ref, n):
        return ref[: ref.index(eos) + 1] if eos in ref[:n] else ref[:n]
    assert out.tokens == [cut(r, n) for r, n in zip(reference, [14, 3, 0, 9])]
    assert out.tokens[0][-1] == eos and len(out.tokens[0]) == 6


def test_parked_sequences_stay_within_the_cache(target, draft):
    """A sequence that finishes early while another runs on: the cache is sized for the longest need."""
    out = generate(draft, target, [[3, 4], list(range(3, 30))], max_new_tokens=[1, 30], gamma=4, eos_ids=())
    assert [len(t) for t in out.tokens] == [1, 30]


def test_greedy_acceptance_rule():
    drafts = torch.tensor([[1, 2, 3], [1, 0, 3], [0, 2, 3]])
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]), 5).float()
    n, nxt = accept_greedy(drafts, logits)
    assert n.tolist() == [3, 1, 0] and nxt.tolist() == [4, 2, 1]


def chi_square_rejects(counts, probs, n) -> tuple[float, float]:
    """(statistic, critical value at p = 0.0005) with cells of expected count < 5 pooled."""
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    k = int(keep.sum()) - 1
    z = 3.29  # Wilson-Hilferty quantile of chi2(k)
    return stat, k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def test_sample_by_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    below_one = 1 - 2.0 ** -24
    assert sample(probs, torch.tensor([0.0, below_one, below_one])).tolist() == [1, 1, 3]
    assert sample(probs, torch.tensor([0.3, 0.5, 0.5])).tolist() == [2, 1, 2]  # a point on a cdf step: the next


def wrong_residual(p, q):
    return p  # resampling from the target after a rejection (a classic bug) biases towards the draft


@pytest.mark.parametrize("rule", ["residual", "wrong"])
def test_accept_sampling_first_token_is_target_distributed(rule, monkeypatch):
    g = torch.Generator().manual_seed(0)
    V, n = 5, 20000
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    if rule == "wrong":
        monkeypatch.setattr(speculative, "residual", wrong_residual)
    drafts = torch.multinomial(q.expand(n, V), 1, replacement=True, generator=g)
    acc, nxt = accept_sampling(drafts, q.expand(n, 1, V), p.expand(n, 2, V), torch.rand(n, 2, generator=g))
    first = torch.where(acc > 0, drafts[:, 0], nxt)
    stat, critical = chi_square_rejects(torch.bincount(first, minlength=V).float(), p, n)
    assert (stat > critical) == (rule == "wrong"), (stat, critical)


def exact_joint(model, prompt, sampler, V):
    """P(t1, t2) of the target's own sampling: [V * V]."""
    def dist(seq):
        hidden, _ = model(torch.tensor([seq]), model.new_cache(1, len(seq)), torch.zeros(1, dtype=torch.int32),
                          attend=causal_attention)
        return sampler.probs(model.logits(hidden[:, -1])[:, :V])[0].double()
    p1 = dist(prompt)
    return torch.stack([p1[t] * dist(prompt + [t]) for t in range(V)]).flatten()


@pytest.mark.parametrize("rule", ["residual", "wrong"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)], ids=["t1", "t0.7-p0.8"])
def test_speculative_sampling_reproduces_target_distribution(rule, temperature, top_p, monkeypatch):
    """6000 seeded draws (one batch of identical prompts) of the first two new tokens against the exact
    joint distribution of the target; with the wrong residual rule the same statistic rejects."""
    V, n = 6, 6000
    target = tiny(layers=2, hidden=32, heads=2, kv_heads=1, vocab=V, seed=3, std=0.6)
    draft = tiny(layers=1, hidden=32, heads=2, kv_heads=1, vocab=V, seed=4, std=0.6)
    prompt = [1, 4, 2]
    want = exact_joint(target, prompt, Sampler(temperature, top_p), V)
    if rule == "wrong":
        monkeypatch.setattr(speculative, "residual", wrong_residual)
    sampler = Sampler(temperature, top_p, torch.Generator().manual_seed(7))
    out = generate(draft, target, [prompt] * n, max_new_tokens=2, gamma=2, sampler=sampler, eos_ids=())
    assert 1.0 < out.stats.mean_accept < 3.0  # drafts are both accepted and rejected
    pairs = torch.tensor([t[0] * V + t[1] for t in out.tokens])
    stat, critical = chi_square_rejects(torch.bincount(pairs, minlength=V * V).float(), want.float(), n)
    assert (stat > critical) == (rule == "wrong"), (stat, critical)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = Sampler(1.0, 0.7).probs(logits)
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(Sampler(1.0, 0.8).probs(logits)[0, :2], torch.tensor([0.625, 0.375]))
    assert Sampler(1.0, 0.81).probs(logits)[0, 2] > 0


def test_profile_roundtrip_and_checks(tmp_path, target, draft):
    profile = RetrievalProfile({0: (1, 2), 1: (3,)}, 2, (0, 1), m=5)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile.to_json(budget=64)))
    loaded = RetrievalProfile.load(path, draft.config, target.config)
    assert (loaded.draft_heads, loaded.target_layer, loaded.target_heads, loaded.m) == ({0: (1, 2), 1: (3,)}, 2,
                                                                                       (0, 1), 5)
    assert make_policy("dustin", loaded, budget=64).m == 5
    path.write_text(json.dumps(RetrievalProfile({0: (1,)}, 7, (0,)).to_json()))
    with pytest.raises(ValueError, match="target layer 7"):
        RetrievalProfile.load(path, draft.config, target.config)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a dustin-profile/1 profile"):
        RetrievalProfile.load(path, draft.config, target.config)
    with pytest.raises(FileNotFoundError, match="no such profile"):
        RetrievalProfile.load(tmp_path / "none.json", draft.config, target.config)
    for text in ('{"format": "dustin-profile/1"}', '{"format": "dustin-profile/1", "draft_heads": [0], '
                 '"target_layer": 0, "target_heads": [0]}', '{"format": "dustin-profile/1", "draft_heads": '
                 '{"0": [0]}, "target_layer": "x", "target_heads": [0]}'):
        path.write_text(text)
        with pytest.raises(ValueError, match="malformed dustin-profile/1 profile"):
            RetrievalProfile.load(path, draft.config, target.config)
    for text, match in (("[1, 2]", "not a dustin-profile/1 profile"), ("{", "not a JSON profile")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            RetrievalProfile.load(path, draft.config, target.config)


def test_default_profile_is_documented_layers():
    def cfg(n):
        return ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=n, num_heads=2,
                           num_kv_heads=1, head_dim=4)
    p = RetrievalProfile.default(cfg(24), cfg(80))
    assert sorted(p.draft_heads) == [6, 12, 18] and p.target_layer == 40 and p.target_heads == (0, 1)
    assert make_policy("dustin", p).m == 128


def test_policy_kinds():
    p = RetrievalProfile({0: (0,)}, 1, (0,))
    assert isinstance(make_policy("dense"), Dense) and isinstance(make_policy("streaming", budget=20), Streaming)
    assert make_policy("draft-only", p).target_heads == {} and make_policy("target-only", p).draft_heads == {}
    assert isinstance(make_policy("dustin", p), Dustin)


def test_bad_inputs(target, draft):
    p = RetrievalProfile({0: (0,)}, 1, (0,))
    with pytest.raises(ValueError, match="policy: expected one of"):
        make_policy("h2o", p)
    with pytest.raises(ValueError, match="budget: expected at least sink \\+ recent = 20"):
        make_policy("dustin", p, budget=16)
    with pytest.raises(ValueError, match="budget: expected at least sink"):
        make_policy("streaming", budget=3, sink=4)
    with pytest.raises(ValueError, match="m: expected an int in"):
        make_policy("dustin", p, budget=32, m=40)
    with pytest.raises(ValueError, match="profile: policy 'dustin' needs retrieval heads"):
        make_policy("dustin", None)
    with pytest.raises(ValueError, match="prompts: expected at least one non-empty"):
        generate(draft, target, [[1, 2], []])
    with pytest.raises(ValueError, match="max_len: the longest prompt"):
        generate(draft, target, [list(range(40))], max_new_tokens=10, max_len=32)
    with pytest.raises(ValueError, match="gamma: expected an int >= 1 with a draft"):
        generate(None, target, [[1, 2]], gamma=2)
    with pytest.raises(ValueError, match="needs a draft model"):
        generate(None, target, [[1, 2]], gamma=0, policy=make_policy("draft-only", p))
    with pytest.raises(ValueError, match="max_new_tokens: expected an int"):
        generate(draft, target, [[1, 2]], max_new_tokens=[3, 4])
    with pytest.raises(ValueError, match="top_p"):
        Sampler(1.0, 0.0)
