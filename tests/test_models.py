"""Our Llama / Qwen2 decoders against Hugging Face transformers on tiny random checkpoints: prefill,
chunked prefill with ragged prompts, incremental decoding through the cache, Llama-3 rope scaling,
sharded checkpoints, tokenizers, dtypes, bad folders."""
import json

import pytest
import torch

from dustin_kernels import dense_verify
from dustin_kernels.models import ModelConfig, causal_attention, load_config, load_model, load_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 96
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
CASES = {
    "llama": dict(family="llama"),
    "llama-bias-tied": dict(family="llama", attention_bias=True, tie_word_embeddings=True),
    "llama3-rope": dict(family="llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
    "qwen2": dict(family="qwen2"),
    "qwen2-tied-sharded": dict(family="qwen2", tie_word_embeddings=True, shard=True),
}


def make_tokenizer_json(path, vocab=VOCAB):
    """A word-level tokenizer.json with `vocab` entries made with the `tokenizers` package."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(path))


def make_checkpoint(folder, family="llama", shard=False, seed=0, layers=2, **overrides):
    """save_pretrained of a tiny random transformers model (every weight and bias random); returns it."""
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=2,
              bos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "lm_head" not in name or not kw.get("tie_word_embeddings"):
                p.normal_(0, 0.08)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    make_tokenizer_json(folder / "tokenizer.json", kw["vocab_size"])
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    overrides = dict(CASES[request.param])
    hf = make_checkpoint(folder, **overrides)
    if overrides.get("shard"):
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    return hf, load_model(folder), folder


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)[None]).logits[0].float()


def test_config_matches(pair):
    hf, ours, folder = pair
    c = ours.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.eos_token_ids == (2,)
    assert c.family == json.loads((folder / "config.json").read_text())["model_type"]


def test_prefill_logits_equal_transformers(pair):
    hf, ours, _ = pair
    ids = torch.randint(0, VOCAB, (2, 37))
    cache = ours.new_cache(2, 64)
    hidden, _ = ours(ids, cache, torch.zeros(2, dtype=torch.int32), attend=causal_attention)
    want = torch.stack([hf_logits(hf, row.tolist()) for row in ids])
    torch.testing.assert_close(ours.logits(hidden), want, atol=2e-5, rtol=2e-5)


def test_chunked_ragged_prefill_then_incremental_decode(pair):
    """Ragged prompts prefilled in chunks of 5, then windows of 1 and 3 tokens through dense_verify:
    every step's logits equal transformers on the whole sequence."""
    hf, ours, _ = pair
    lengths = [23, 9, 16]
    seqs = [torch.randint(0, VOCAB, (n + 6,)).tolist() for n in lengths]
    tokens = torch.zeros(3, max(lengths), dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.tensor(seqs[b][:n])
    cache = ours.new_cache(3, 40)
    last, _ = ours.prefill(tokens, torch.tensor(lengths), cache, chunk=5)
    want = [hf_logits(hf, s) for s in seqs]
    torch.testing.assert_close(ours.logits(last), torch.stack([w[n - 1] for w, n in zip(want, lengths)]),
                               atol=2e-5, rtol=2e-5)
    lens = torch.tensor(lengths, dtype=torch.int32)
    for T in (1, 2, 3):  # windows at per-sequence positions
        window = torch.stack([torch.tensor(s[n:n + T]) for s, n in zip(seqs, lens.tolist())])
        hidden, _ = ours(window, cache, lens, attend=dense_verify)
        got = ours.logits(hidden)
        for b, n in enumerate(lens.tolist()):
            torch.testing.assert_close(got[b], want[b][n:n + T], atol=2e-5, rtol=2e-5)
        lens = lens + T


def test_capture_returns_the_queries(pair):
    """capture: a pass returns the layer's post-RoPE queries; prefill returns the last real token's."""
    _, ours, _ = pair
    ids = torch.randint(0, VOCAB, (1, 12))
    cache = ours.new_cache(1, 16)
    _, queries = ours(ids, cache, torch.zeros(1, dtype=torch.int32), attend=causal_attention, capture=[1])
    assert list(queries) == [1] and queries[1].shape == (1, 4, 12, 16)
    _, q_last = ours.prefill(ids, torch.tensor([12]), ours.new_cache(1, 16), chunk=5, capture=[1])
    torch.testing.assert_close(q_last[1][:, :, 0], queries[1][:, :, -1])


def test_llama3_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, rope_scaling=dict(LLAMA3_ROPE),
                                      rope_theta=500000.0, max_position_embeddings=1024)
    want, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = ModelConfig.from_hf(hf_cfg.to_dict()).inv_freq()
    assert scaling == 1.0
    torch.testing.assert_close(ours, want, atol=0, rtol=1e-6)
    assert not torch.allclose(ours, ModelConfig.from_hf(transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_theta=500000.0).to_dict()).inv_freq())


def test_old_style_config_keys():
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
           "eos_token_id": [5, 6]}
    c = ModelConfig.from_hf(cfg)
    assert c.rope_theta == 1000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.num_kv_heads == 2 and c.eos_token_ids == (5, 6)
    torch.testing.assert_close(c.inv_freq(), 1 / 1000.0 ** (torch.arange(0, 4, 2) / 4) / 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_load(tmp_path, dtype):
    hf = make_checkpoint(tmp_path, family="qwen2")
    ours = load_model(tmp_path, dtype=dtype)
    assert ours.dtype == dtype and ours.lm_head.weight.dtype == dtype
    ids = torch.randint(0, VOCAB, (1, 20))
    hidden, _ = ours(ids, ours.new_cache(1, 32), torch.zeros(1, dtype=torch.int32), attend=causal_attention)
    want = hf_logits(hf, ids[0].tolist())
    err = (ours.logits(hidden)[0] - want).abs().max() / want.abs().max()
    assert err < (0.01 if dtype == torch.float16 else 0.05)


def test_tokenizer_roundtrip(tmp_path):
    make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("w5 w7 w90").ids
    assert ids == [5, 7, 90] and tok.decode(ids) == "w5 w7 w90"


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_config(tmp_path)
    make_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_tokenizer(tmp_path)


def test_weights_must_match_config(tmp_path):
    make_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        load_model(tmp_path)


BASE_CONFIG = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("change, problem", [
    ({"hidden_size": None}, "missing key 'hidden_size'"),
    ({"num_attention_heads": "2"}, "key 'num_attention_heads': expected a positive int, got '2'"),
    ({"num_attention_heads": 0}, "key 'num_attention_heads': expected a positive int, got 0"),
    ({"num_key_value_heads": 0}, "key 'num_key_value_heads': expected a positive int, got 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: 3 must divide num_attention_heads 2"),
    ({"head_dim": 5}, "head_dim: expected an even head dim"),
    ({"hidden_size": 9}, "key 'hidden_size': expected a multiple of num_attention_heads=2 (there is no head_dim)"),
    ({"vocab_size": 1.5}, "key 'vocab_size': expected a positive int, got 1.5"),
    ({"rms_norm_eps": -1}, "key 'rms_norm_eps': expected a positive number"),
    ({"rope_theta": "big"}, "key 'rope_theta': expected a positive number"),
    ({"rope_scaling": {"rope_type": "linear"}}, "missing key 'rope_scaling.factor'"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "key 'rope_scaling.factor': expected a positive number"),
    ({"rope_scaling": dict(LLAMA3_ROPE, low_freq_factor=4.0)}, "expected high_freq_factor > low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
    ({"rope_parameters": [1]}, "key 'rope_parameters': expected an object"),
    ({"tie_word_embeddings": "false"}, "key 'tie_word_embeddings': expected true or false"),
    ({"eos_token_id": [2, "x"]}, "key 'eos_token_id': expected a token id or a list of them"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_config_values_name_the_file_and_the_key(tmp_path, change, problem):
    cfg = {k: v for k, v in {**BASE_CONFIG, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as caught:
        load_config(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and problem in message and "\n" not in message


@pytest.mark.parametrize("text", ['{"model_type": "llama", ', "\xff garbage", "[1, 2]"], ids=["torn", "bytes", "list"])
def test_unparsable_config_json(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{tmp_path / 'config.json'}: (not a JSON file|expected a JSON object)"):
        load_config(tmp_path)


def test_damaged_weights_and_tokenizer_name_the_file(tmp_path):
    make_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])  # a truncated download
    with pytest.raises(ValueError, match=f"^{weights}: not a readable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(ValueError, match=f"^{tmp_path / 'tokenizer.json'}: not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("weight_map, problem", [
    (None, "not a JSON file"),
    ([], "key 'weight_map': expected an object"),
    ({"embed_tokens.weight": "/etc/passwd"}, "expected shard file names inside the checkpoint folder, got '/etc/"),
    ({"embed_tokens.weight": "../outside.safetensors"}, "inside the checkpoint folder, got '../outside.safetensors'"),
    ({"embed_tokens.weight": 7}, "inside the checkpoint folder, got 7"),
], ids=["torn", "list", "absolute", "parent", "not-a-name"])
def test_bad_shard_index(tmp_path, weight_map, problem):
    make_checkpoint(tmp_path / "ckpt", shard=True)
    shard = sorted((tmp_path / "ckpt").glob("*.safetensors"))[0]
    (tmp_path / "outside.safetensors").write_bytes(shard.read_bytes())  # readable, but not the checkpoint's
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.write_text('{"weight_map": {' if weight_map is None else json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as caught:
        load_model(tmp_path / "ckpt")
    assert str(caught.value).startswith(f"{index}: ") and problem in str(caught.value)
