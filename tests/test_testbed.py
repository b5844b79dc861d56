"""The retrieval testbed: pinned bytes, Hugging Face folders that transformers runs and recalls with,
heads that do what they are built for, and the policies told apart on it (dense and Dustin recall
every planted value, sink + recent none)."""
import dataclasses
import json

import pytest
import torch

from dustin_kernels import testbed
from dustin_kernels.models import load_model
from dustin_kernels.policies import RetrievalProfile, make_policy
from dustin_kernels.speculative import generate

SPEC = testbed.TestbedSpec()


@pytest.fixture(scope="module")
def pair():
    return testbed.models(SPEC)


@pytest.fixture(scope="module")
def prompts():
    return [testbed.prompt(SPEC, 2000, seed=seed) for seed in range(4)]


def recalls(draft, target, prompts, policy, **kw):
    """(recall per prompt, mean acceptance length) of one batch generation."""
    out = generate(draft, target, [p for p, _ in prompts], max_new_tokens=8, eos_ids=(), policy=policy, **kw)
    return [testbed.recall(t, v) for t, (_, v) in zip(out.tokens, prompts)], out.stats.mean_accept


def test_built_bytes_are_pinned():
    assert testbed.digest(SPEC) == "b3378242d952cfbaeb96b0aec4b261fc3c6e25b8e8cd5e0cc0dc262f5356e957"


def test_prompt_plants_distinct_needles_and_asks_for_one():
    ids, values = testbed.prompt(SPEC, 500, needles=3, seed=1)
    words = SPEC.words
    assert len(ids) == 500 and ids[0] == testbed.BOS and words[ids[-1]].startswith("key")
    at = ids.index(ids[-1])  # the asked key's needle: the key, then its values
    assert at < len(ids) - 1 and ids[at + 1:at + 9] == values
    planted = [i for i in ids if words[i].isdigit()]
    assert len(planted) == len(set(planted)) == 3 * 8
    assert testbed.recall(values, values) == 1.0 and testbed.recall(values[::-1], values) == 0.0
    with pytest.raises(ValueError, match="needles: 9 needles"):
        testbed.prompt(SPEC, 500, needles=9)
    with pytest.raises(ValueError, match="shape: hidden 64 cannot hold"):
        testbed.TestbedSpec(shape=testbed.AttentionShape(1, 1, 64, 2))
    with pytest.raises(ValueError, match="family"):
        testbed.TestbedSpec(family="gpt2")
    with pytest.raises(ValueError, match="filler, keys, values"):
        testbed.TestbedSpec(filler=71)


def test_heads_do_what_they_are_built_for(pair):
    """Layer 0 head 0 attends to the previous token; the target's retrieval heads attend to the position
    after the asked key's earlier occurrence when reading the final key; sink heads to <s>."""
    draft, target = pair
    ids, values = testbed.prompt(SPEC, 1500, seed=2)
    cache = target.new_cache(1, len(ids))
    _, queries = target(torch.tensor([ids]), cache, torch.zeros(1, dtype=torch.int32),
                        capture=range(SPEC.shape.layers))
    n = len(ids)
    causal = torch.ones(n, n).tril().bool()

    def weights(layer, head):
        q = queries[layer][0, head]
        k = cache.k[layer][0, head // SPEC.shape.group, :n]
        return torch.softmax((q @ k.T / SPEC.shape.head_dim ** 0.5).masked_fill(~causal, -torch.inf), -1)

    prev = weights(0, 0)
    assert prev[torch.arange(1, n), torch.arange(n - 1)].min() > 0.99
    answer = ids.index(ids[-1]) + 1  # the first value, after the key's planted occurrence
    for layer in SPEC.retrieval_layers:
        for head in SPEC.retrieval_heads():
            assert weights(layer, head)[-1, answer] > 0.9
    sink = SPEC.head_roles("previous").index("sink")
    assert weights(0, sink)[-1, 0] > 0.9


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_folders_run_in_transformers_and_our_loader(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    spec = dataclasses.replace(SPEC, family=family)
    paths = testbed.write(spec, tmp_path)
    ids, values = testbed.prompt(spec, 1200, seed=5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["target"], dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out[0, len(ids):].tolist() == values
    ours = load_model(paths["target"])
    got = generate(None, ours, [ids], max_new_tokens=8, gamma=0, eos_ids=())
    assert got.tokens[0] == values
    with torch.no_grad():
        want = hf(torch.tensor([ids[-50:]])).logits[0].float()
        mine, _ = ours(torch.tensor([ids[-50:]]), ours.new_cache(1, 50), torch.zeros(1, dtype=torch.int32))
    torch.testing.assert_close(ours.logits(mine)[0], want, atol=2e-4, rtol=2e-4)


def test_dense_recalls_everything_and_sink_recent_nothing(pair, prompts):
    draft, target = pair
    dense, accept = recalls(draft, target, prompts, make_policy("dense"), gamma=4)
    assert dense == [1.0] * 4 and 1.0 < accept < 5.0  # the noisy draft is accepted only in part
    streaming, _ = recalls(draft, target, prompts, make_policy("streaming", budget=64), gamma=4)
    assert max(streaming) <= 0.125


def test_s_draft_covers_the_pending_row():
    """With a draft that retrieves, the paper's rule recalls every value at budget 64: S_draft includes the
    draft's query of the pending token (the first verified row), whose needle position neither the drafts'
    queries nor the target's committed query points at."""
    spec = dataclasses.replace(SPEC, draft_noise=0.5)
    draft, target = testbed.models(spec)
    prompts = [testbed.prompt(spec, 2000, seed=seed) for seed in range(3)]
    for name in ("dustin-paper", "draft-only"):
        got, accept = recalls(draft, target, prompts, make_policy(name, testbed.profile(spec), budget=64), gamma=4)
        assert got == [1.0] * 3 and accept == 5.0, name


def test_refining_recalls_as_dense_where_the_draft_misses(pair, prompts):
    """The default (noisy) draft misses needles; refining the selection from the target's window queries at
    its retrieval layer still recalls every value, with dense's acceptance; the paper's rule does not."""
    draft, target = pair
    profile = testbed.profile(SPEC)
    dense, dense_accept = recalls(draft, target, prompts, make_policy("dense"), gamma=4)
    refined, accept = recalls(draft, target, prompts, make_policy("dustin", profile, budget=64), gamma=4)
    assert refined == dense == [1.0] * 4 and accept == dense_accept
    paper, _ = recalls(draft, target, prompts, make_policy("dustin-paper", profile, budget=64), gamma=4)
    assert min(paper) < 1.0


def test_calibrate_finds_the_retrieval_heads_and_reaches_dense_recall(tmp_path, capsys):
    """`calibrate` on the written folders picks the induction heads (target and draft) and no decoy; with
    its profile, Dustin at budget 64 of a 4K prompt recalls what dense recalls."""
    from dustin_kernels import calibrate, generate as cli

    paths = testbed.write(SPEC, tmp_path)
    folders = ["--target", str(paths["target"]), "--draft", str(paths["draft"])]
    assert calibrate.main([*folders, "--out", str(tmp_path / "p.json"), "--length", "2048", "--samples", "2",
                           "--budget", "64", "--trials", "6"]) == 0, capsys.readouterr().err
    profile = RetrievalProfile.load(tmp_path / "p.json", *(m.config for m in testbed.models(SPEC)))
    known = testbed.profile(SPEC)
    assert profile.draft_heads == known.draft_heads
    assert profile.target_layer in SPEC.retrieval_layers and profile.target_heads == known.target_heads
    prompts = [testbed.prompt(SPEC, 4096, seed=seed) for seed in (10, 11)]
    for prompt_ids, values in prompts:
        (tmp_path / "prompt.txt").write_text(testbed.tokenizer(SPEC).decode(prompt_ids, skip_special_tokens=False))
        capsys.readouterr()
        assert cli.main([*folders, "--prompt-file", str(tmp_path / "prompt.txt"), "--profile", str(tmp_path / "p.json"),
                         "--budget", "64", "--max-new-tokens", "8", "--policy", "dense", "dustin", "--json"]) == 0
        rows = {r["policy"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        assert testbed.recall(rows["dense"]["token_ids"][0], values) == 1.0
        assert testbed.recall(rows["dustin"]["token_ids"][0], values) == 1.0


def test_a_narrower_draft_drafts_and_retrieves_as_well(prompts):
    """draft_kv_heads=1: the draft's KV cache is half the target's per layer (real drafts are narrower); its
    retrieval head is q head 0, and dense and dustin recall every value at the default draft's acceptance."""
    spec = dataclasses.replace(SPEC, draft_kv_heads=1)
    draft, target = testbed.models(spec)
    assert draft.config.num_kv_heads == 1 and target.config.num_kv_heads == SPEC.shape.kv_heads
    profile = testbed.profile(spec)
    assert profile.draft_heads == {1: (0,)} and profile.target_heads == SPEC.retrieval_heads()
    wide, wide_accept = recalls(*testbed.models(SPEC), prompts, make_policy("dense"), gamma=4)
    for name in ("dense", "dustin"):
        got, accept = recalls(draft, target, prompts, make_policy(name, profile, budget=64), gamma=4)
        assert got == wide == [1.0] * 4 and accept == wide_accept, name


@pytest.mark.parametrize("kv", [0, 3, 4, 1.0])
def test_bad_draft_kv_heads(kv):
    with pytest.raises(ValueError, match="draft_kv_heads: expected None or a divisor of the 4 q heads"):
        dataclasses.replace(SPEC, draft_kv_heads=kv)
