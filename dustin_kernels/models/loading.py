"""Hugging Face checkpoint folders: `config.json`, `model.safetensors` or sharded `*.safetensors` with
`model.safetensors.index.json`, and `tokenizer.json` (read with the `tokenizers` package)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .transformer import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _folder(path) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    return folder


def _file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: missing {name}")
    return path


def load_config(path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads(_file(_folder(path), "config.json").read_text()))


def weight_files(folder: Path) -> list[Path]:
    """The shards named by `model.safetensors.index.json`, else `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [_file(folder, name) for name in names]
    return [_file(folder, "model.safetensors")]


def load_model(path, *, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    """A Llama / Qwen2 checkpoint folder as a `Transformer` in `dtype` on `device`, in eval mode."""
    from safetensors.torch import load_file

    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    folder = _folder(path)
    config = load_config(folder)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for file in weight_files(folder):
        for name, tensor in load_file(str(file), device=str(device)).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            state[name.removeprefix("model.")] = tensor.to(dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {n for n, _ in model.named_parameters()}
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        raise ValueError(f"{folder}: weights do not match config.json (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, param in model.named_parameters():
        if name in state and state[name].shape != param.shape:
            raise ValueError(f"{folder}: weight {name} has shape {tuple(state[name].shape)}, config.json "
                             f"implies {tuple(param.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def load_tokenizer(path):
    """`tokenizer.json` of a checkpoint folder as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_file(_folder(path), "tokenizer.json")))
