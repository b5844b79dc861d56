"""Hugging Face checkpoint folders: `config.json`, `model.safetensors` or sharded `*.safetensors` with
`model.safetensors.index.json`, and `tokenizer.json` (read with the `tokenizers` package).

A missing file raises FileNotFoundError; a file that cannot be parsed or holds a bad value raises
ValueError with a one-line message naming the file (and the key). Shards named by the index must be
files inside the folder (relative names without '..')."""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

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


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
        raise ValueError(f"{path}: not a JSON file ({type(exc).__name__}: {str(exc)[:120]})") from None


def load_config(path) -> ModelConfig:
    """`config.json` of a checkpoint folder as a `ModelConfig`."""
    config = _file(_folder(path), "config.json")
    return ModelConfig.from_hf(_json(config), source=str(config))


def _shard_name(index: Path, name) -> str:
    """A shard file name of the index's weight_map: a relative path inside the folder."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or ".." in parts:
        raise ValueError(f"{index}: key 'weight_map': expected shard file names inside the checkpoint folder, "
                         f"got {name!r}")
    return name


def weight_files(folder: Path) -> list[Path]:
    """The shards named by `model.safetensors.index.json`, else `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = _json(index)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: key 'weight_map': expected an object of tensor name -> shard file")
        return [_file(folder, name) for name in sorted({_shard_name(index, n) for n in weight_map.values()})]
    return [_file(folder, "model.safetensors")]


def _tensors(file: Path, device) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file}: not a readable safetensors file ({str(exc)[:120]})") from None


def load_model(path, *, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    """A Llama / Qwen2 checkpoint folder as a `Transformer` in `dtype` on `device`, in eval mode."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    folder = _folder(path)
    config = load_config(folder)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for file in weight_files(folder):
        for name, tensor in _tensors(file, device).items():
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

    file = _file(_folder(path), "tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers package raises a plain Exception on a malformed file
        raise ValueError(f"{file}: not a readable tokenizer.json ({str(exc)[:120]})") from None
