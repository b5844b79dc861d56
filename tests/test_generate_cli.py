"""The command lines: `python -m dustin_kernels.generate` (folders, batch, --json, --profile, --demo),
`python -m dustin_kernels.calibrate`, and bad input: clear message and a non-zero exit."""
import json
import subprocess
import sys

import pytest
import torch

from dustin_kernels import calibrate, generate
from dustin_kernels.models import load_model
from dustin_kernels.policies import POLICIES

pytest.importorskip("transformers")
from test_models import make_checkpoint, make_tokenizer_json  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_checkpoint(root / "target", family="llama", layers=3, seed=0)
    make_checkpoint(root / "draft", family="qwen2", layers=2, seed=1, shard=True)
    return root


def run_cli(capsys, *argv):
    code = generate.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        hidden, _ = model(torch.tensor([seq]), model.new_cache(1, len(seq)), torch.zeros(1, dtype=torch.int32))
        seq.append(int(model.logits(hidden[0, -1]).argmax()))
    return seq[len(prompt):]


def test_generate_json_batch_matches_target_greedy(pair, capsys, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("w3 w4 w5 w6 w7 w8 w9")
    code, out, err = run_cli(capsys, "--target", pair / "target", "--draft", pair / "draft", "--prompt",
                             "w10 w11 w12 w90 w91 w40 w41 w42 w43 w44 w45", "--prompt-file", prompt_file,
                             "--max-new-tokens", 12, "--gamma", 3, "--policy", "dustin", "--budget", 64,
                             "--device", "cpu", "--json")
    assert code == 0, err
    assert "no --profile: default retrieval heads" in err  # said once, on stderr with --json
    result = json.loads(out)
    target = load_model(pair / "target")
    eos = target.config.eos_token_ids
    seqs = result["sequences"]
    assert [s["prompt_tokens"] for s in seqs] == [11, 7]
    for s, prompt in zip(seqs, ([10, 11, 12, 90, 91, 40, 41, 42, 43, 44, 45], [3, 4, 5, 6, 7, 8, 9])):
        want = greedy(target, prompt, 12)
        want = want[: want.index(eos[0]) + 1] if eos[0] in want else want
        assert s["token_ids"] == want
        assert s["text"] == " ".join(f"w{t}" for t in want if t > 2)
    stats = result["stats"]
    assert {"accept_hist", "mean_accept", "tokens_per_s", "kv_read_bytes", "kv_dense_bytes",
            "kv_fraction"} <= set(stats)
    assert result["policy"]["name"] == "dustin" and result["policy"]["budget"] == 64


def test_generate_text_output_and_sampling(pair, capsys):
    code, out, err = run_cli(capsys, "--target", pair / "target", "--draft", pair / "draft", "--prompt", "w5 w6 w7",
                             "--max-new-tokens", 8, "--policy", "streaming", "--budget", 24, "--temperature", 0.8,
                             "--top-p", 0.9, "--seed", 3, "--dtype", "bf16", "--fidelity")
    assert code == 0, err
    assert "--- sequence 0 (3 prompt tokens" in out and "acceptance length: mean" in out
    assert "verification KV bytes" in out and "no --profile" not in out
    assert "fidelity vs dense verification" in out and "greedy agreement" in out


def test_generate_compares_policies_in_one_run(pair, capsys):
    argv = ["--target", pair / "target", "--draft", pair / "draft", "--prompt", "w10 w11 w12 w90 w91 w40 w41 w42",
            "--prompt", "w3 w4 w5", "--max-new-tokens", 10, "--gamma", 3, "--budget", 24, "--sink", 2, "--recent", 4]
    code, out, err = run_cli(capsys, *argv, "--policy", "plain", "dense", "streaming", "dustin", "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "dense", "streaming", "dustin"]
    assert rows["plain"]["same_as_first"] == 1.0 and rows["plain"]["mean_accept"] == 1.0
    assert rows["dense"]["token_ids"] == rows["plain"]["token_ids"]  # greedy: dense verification is exact
    assert rows["dustin"]["kv_fraction"] > 1  # short prompts: the budget holds them, the scores cost extra
    assert set(result["policies"]) == {"dense", "streaming", "dustin"}
    code, out, err = run_cli(capsys, *argv, "--policy", "plain", "dustin", "--fidelity")
    assert code == 0, err
    assert "same as plain" in out and "mass kept" in out and "agreement" in out and out.count("\n") < 16
    assert "first sequence's new text, per policy:" in out and "[2/2] dustin" in err  # texts, progress


def test_prompts_keep_the_order_given(pair, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("w3 w4 w5 w6")
    code, out, err = run_cli(capsys, "--target", pair / "target", "--draft", pair / "draft", "--prompt-file",
                             tmp_path / "p.txt", "--prompt", "w10 w11", "--max-new-tokens", 2, "--json")
    assert code == 0, err
    assert [s["prompt_tokens"] for s in json.loads(out)["sequences"]] == [4, 2]


def run_calibrate(pair, out_file, *argv) -> int:
    return calibrate.main(["--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out", str(out_file),
                           "--length", "192", "--samples", "2", "--heads", "2", "--device", "cpu", *map(str, argv)])


def test_calibrate_then_generate_with_profile(pair, capsys, tmp_path):
    out_file = tmp_path / "profile.json"
    code = run_calibrate(pair, out_file, "--budget", 24, "--trials", 4, "--gamma", 3)
    assert code == 0, capsys.readouterr().err
    profile = json.loads(out_file.read_text())
    assert profile["format"] == "dustin-profile/1"
    assert 0 <= profile["target_layer"] < 3 and all(0 <= int(k) < 2 for k in profile["draft_heads"])
    assert all(len(h) == 2 for h in profile["draft_heads"].values()) and len(profile["target_heads"]) == 2
    assert 0 <= profile["m"] <= 24 - 20
    assert set(profile["recovery"]) == {"dustin", "target_only", "draft_only", "streaming"}
    assert all(0 < v <= 1 for v in profile["recovery"].values())
    assert len(profile["needle_scores"]["target"]) == 3
    capsys.readouterr()
    code, out, err = run_cli(capsys, "--target", pair / "target", "--draft", pair / "draft", "--prompt", "w5 w6 w7",
                             "--max-new-tokens", 4, "--profile", out_file, "--budget", 24, "--json")
    assert code == 0, err
    policy = json.loads(out)["policy"]
    assert policy["m"] == profile["m"] and policy["target_heads"] == {
        str(profile["target_layer"]): profile["target_heads"]}


def test_calibrate_stops_when_every_draft_layer_is_chosen(pair, capsys, tmp_path):
    """--draft-layers above the draft's depth (2 here) takes at most every layer, instead of crashing."""
    out_file = tmp_path / "profile.json"
    code = run_calibrate(pair, out_file, "--budget", 64, "--trials", 2, "--draft-layers", 5)
    assert code == 0, capsys.readouterr().err
    assert 1 <= len(json.loads(out_file.read_text())["draft_heads"]) <= 2


@pytest.mark.parametrize("argv,message", [
    (["--samples", "0"], "--samples: expected an int >= 1, got 0"),
    (["--gamma", "0"], "--gamma: expected an int >= 1, got 0"),
    (["--heads", "0"], "--heads: expected an int >= 1, got 0"),
    (["--draft-layers", "0"], "--draft-layers: expected an int >= 1, got 0"),
    (["--trials", "0"], "--trials: expected an int >= 1, got 0"),
    (["--budget", "10"], "budget: expected at least sink + recent = 20"),
    (["--length", "4096"], "--length: 4096 tokens exceed the models' max_position_embeddings (256)"),
    (["--min-score", "0"], "--min-score: expected a fraction in (0, 1]"),
])
def test_calibrate_bad_arguments(pair, capsys, tmp_path, argv, message):
    code = calibrate.main(["--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                           str(tmp_path / "p.json"), "--length", "192", "--budget", "24", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("error: "), err
    assert not (tmp_path / "p.json").exists()


def test_calibrate_checks_out_before_calibrating(pair, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate, "calibrate", lambda *a, **k: pytest.fail("calibrated before checking --out"))
    code = calibrate.main(["--target", str(pair / "target"), "--draft", str(pair / "draft"), "--out",
                           str(tmp_path / "missing" / "p.json")])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_demo_json(capsys):
    """The demo runs the retrieval testbed: dense verification recalls every asked value, Dustin at a
    budget of 64 too, StreamingLLM none."""
    code, out, err = run_cli(capsys, "--demo", "--json", "--context", 1000, "--fidelity")
    assert code == 0, err
    err = " ".join(err.split())  # the header is wrapped
    assert "retrieval testbed" in err and "Batch of 2 prompts (1000, 700 tokens)" in err
    result = json.loads(out)
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["plain", *POLICIES]
    assert rows["plain"]["recall"] == rows["dense"]["recall"] == rows["dustin"]["recall"] == 1.0
    assert rows["streaming"]["recall"] == 0.0
    assert rows["dense"]["same_as_first"] == 1.0 and rows["dense"]["mean_accept"] > 1.5
    assert rows["streaming"]["kv_fraction"] < rows["dustin"]["kv_fraction"] < 0.5
    assert rows["plain"]["fidelity"] is None and rows["dense"]["fidelity"] is None  # nothing to compare
    assert rows["dustin"]["fidelity"]["greedy_agreement"] == 1.0 > rows["streaming"]["fidelity"]["greedy_agreement"]
    assert [len(e) for e in result["expected"]] == [8, 8]


def test_demo_of_a_preset_shape_and_a_longer_batch(capsys):
    code, out, err = run_cli(capsys, "--demo", "--shape", "cpu-small", "--layers", 3, "--context", 300, "--batch", 3,
                             "--budget", 32, "--policy", "plain", "dense", "dustin", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["testbed"]["shape"] == {"q_heads": 8, "kv_heads": 2, "head_dim": 64, "layers": 3}
    err = " ".join(err.split())  # the header is wrapped
    assert "3-layer qwen2 (8 q / 2 KV heads of 64)" in err and "Batch of 3 prompts" in err
    lengths = result["prompt_tokens"]
    assert len(lengths) == 3 and lengths[0] > lengths[1] > lengths[2] >= 0.7 * lengths[0] - 20
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "dense", "dustin"] and rows["dense"]["same_as_first"] == 1.0
    assert rows["dense"]["recall"] == rows["dustin"]["recall"] == 1.0
    assert rows["dustin"]["kv_fraction"] < 1  # 32 of about 300 history tokens


def test_demo_rejects_a_bad_budget_before_decoding(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(generate, "generate", lambda *a, **k: calls.append(1))
    for budget in ("0", "3"):
        code, out, err = run_cli(capsys, "--demo", "--budget", budget)
        assert code == 2 and "budget: expected at least sink + recent = 20" in err, err
    assert calls == []  # failed before the plain run, not after it


def test_bad_folder_exits_non_zero_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dustin_kernels.generate", "--target", str(tmp_path / "nope"),
                           "--draft", str(tmp_path), "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "nope: no such checkpoint folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    make_checkpoint(folder, family="llama", seed=2, vocab_size=80)
    make_tokenizer_json(folder / "tokenizer.json", 80)
    return folder


def test_bad_inputs(pair, other_vocab, capsys, tmp_path):
    base = ["--target", pair / "target", "--draft", pair / "draft", "--prompt", "w5 w6 w7"]
    cases = [
        (["--target", tmp_path / "missing", "--draft", pair / "draft", "--prompt", "x"],
         "missing: no such checkpoint folder"),
        (["--target", tmp_path, "--draft", pair / "draft", "--prompt", "x"], "missing tokenizer.json"),
        (["--target", pair / "target", "--draft", other_vocab, "--prompt", "x"], "different vocabularies"),
        (base + ["--max-len", 16], "do not fit the cache of 16 positions"),
        (base + ["--max-len", 100000], "--max-len: 100000 exceeds the models' max_position_embeddings (256)"),
        (base + ["--prompt", " ".join(["w9"] * 300)], "300 tokens + --max-new-tokens 128 + --gamma 4 do not fit "
                                                        "the cache of 256"),
        (base + ["--budget", 10], "budget: expected at least sink + recent = 20"),
        (base + ["--budget", 0], "budget: expected at least sink + recent = 20"),  # not the default 512
        (base + ["--profile", tmp_path], "no such profile file"),
        (base + ["--profile", tmp_path / "none.json"], "no such profile file"),
        (base + ["--prompt-file", tmp_path / "none.txt"], "none.txt"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.startswith("error: "), (argv, err)
    (tmp_path / "config.json").write_text("{}")
    make_tokenizer_json(tmp_path / "tokenizer.json")
    code, _, err = run_cli(capsys, "--target", tmp_path, "--draft", pair / "draft", "--prompt", "x")
    assert code == 2 and "model_type None is not supported" in err


@pytest.mark.parametrize("argv,message", [
    (["--policy", "h2o"], "invalid choice: 'h2o'"),
    (["--gamma", "0"], "--gamma must be >= 1"),
    (["--demo", "--layers", "1"], "--layers must be >= 2"),
    (["--max-len", "0"], "--max-len: expected a positive number"),
    (["--estimate-every", "0"], "--estimate-every: expected steps >= 1, got 0"),
    (["--compile", "--fidelity"], "--compile: the compiled step is unprobed"),
    ([], "--target and --draft are required"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        generate.main(["--prompt", "x"] + argv + ([] if argv == [] else ["--target", "t", "--draft", "d"]))
    assert exc.value.code == 2 and message in capsys.readouterr().err
