"""The `--device` argument of the command lines: cpu, or a CUDA device this machine has."""
from __future__ import annotations

import argparse

import torch


def device_arg(value: str) -> torch.device:
    """argparse `type=` for --device: a bad or absent device is a one-line usage error (exit 2)."""
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {value!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: no CUDA GPU on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
