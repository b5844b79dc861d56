"""A vLLM plugin: the target's speculative-decoding verification steps through Dustin's selection.

Installed as the `vllm.general_plugins` entry point `dustin_kernels` (pyproject.toml), so every vLLM
process calls `register()`, which wraps vLLM's own CPU attention backend (`register_backend` overrides
the `CPU_ATTN` member's class path; vLLM's CPU platform always picks that member). The wrapper's
`forward` handles one case and hands every other call to vLLM's implementation unchanged:

- a target layer (not the draft's: vLLM names those `draft_model.*`) at a verification step: every
  request of the batch has the same T > 1 query rows (the pending token and the drafts) and a history;
- layers before the profile's target layer attend densely (vLLM's kernel); at the target layer, the T
  window queries of its retrieval heads score the history (`attention_scores_paged`; under tensor
  parallelism each rank scores the retrieval heads it holds and the score rows are summed over vLLM's
  tensor-parallel group, so every rank selects the same blocks), `select_tokens` keeps sink + recent +
  the best of the rest within the budget, and that layer and the later ones run `sparse_verify_paged`
  over vLLM's paged cache with that selection.

Not covered: CUDA (the same wrapper over `FLASH_ATTN`, whose cache is laid out NHD, is not written
until it can be tested on a GPU), CPU cache layouts other than vLLM's portable "vec" one (AMX and
other ISAs pack K differently), the draft lookahead (vLLM's draft-model proposer does not expose the draft's queries to
the target's pass), prefill and mixed prefill / decode batches, fp8 KV caches, sliding windows, ALiBi,
attention sinks and soft-capping (all handed to vLLM).

Configuration, from the environment (vLLM's worker processes inherit it):
    DUSTIN_VLLM_POLICY   dense (default: every call goes to vLLM) | dustin
    DUSTIN_VLLM_PROFILE  a calibration profile JSON (`python -m dustin_kernels.calibrate`): the target
                         layer and its retrieval heads; needed by dustin
    DUSTIN_VLLM_BUDGET   history tokens each verified sequence reads (default 512)
    DUSTIN_VLLM_SINK, DUSTIN_VLLM_RECENT   (default 4 and 16)
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

TARGET_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Settings:
    policy: str = "dense"
    target_layer: int = -1
    target_heads: tuple[int, ...] = ()
    budget: int = 512
    sink: int = 4
    recent: int = 16

    @classmethod
    @functools.cache
    def from_env(cls) -> "Settings":
        policy = os.environ.get("DUSTIN_VLLM_POLICY", "dense")
        if policy not in ("dense", "dustin"):
            raise ValueError(f"DUSTIN_VLLM_POLICY: expected dense or dustin, got {policy!r}")
        numbers = {}
        for name, default in (("budget", 512), ("sink", 4), ("recent", 16)):
            value = os.environ.get(f"DUSTIN_VLLM_{name.upper()}", str(default))
            if not value.isdigit():
                raise ValueError(f"DUSTIN_VLLM_{name.upper()}: expected a non-negative int, got {value!r}")
            numbers[name] = int(value)
        if policy == "dense":
            return cls(**numbers)
        path = os.environ.get("DUSTIN_VLLM_PROFILE")
        if not path:
            raise ValueError("DUSTIN_VLLM_PROFILE: the dustin policy needs a calibration profile JSON")
        try:
            with open(path) as f:
                profile = json.load(f)
            return cls(policy, int(profile["target_layer"]), tuple(map(int, profile["target_heads"])), **numbers)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"DUSTIN_VLLM_PROFILE {path}: not a readable calibration profile with target_layer "
                             f"and target_heads ({type(err).__name__}: {err})") from None


@dataclasses.dataclass
class Step:
    """The selection of one verification forward, shared by its target layers from the target layer on."""
    metadata: object
    selection: tuple[torch.Tensor, torch.Tensor] | None = None


_step: Step | None = None


def split_cpu_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K pages, V pages), each [num_blocks, Hkv, page, D] (strided views, no copy), of a cache of vLLM's
    CPU backend [num_blocks, Hkv, page, 2 D] in its "vec" layout: per block and KV head, K transposed
    ([D, page]), then V ([page, D])."""
    num_blocks, Hkv, page, two_d = kv_cache.shape
    flat = kv_cache.view(num_blocks, Hkv, page * two_d)
    half = page * two_d // 2
    k = flat[..., :half].view(num_blocks, Hkv, two_d // 2, page).transpose(2, 3)
    v = flat[..., half:].view(num_blocks, Hkv, page, two_d // 2)
    return k, v


def _verification_rows(metadata) -> int:
    """T when every request of the batch verifies T > 1 rows after a history, else 0."""
    starts = metadata.query_start_loc
    rows = starts[1:] - starts[:-1]
    T = int(metadata.max_query_len)
    if T < 2 or not bool((rows == T).all()) or int(starts[-1]) != metadata.num_actual_tokens:
        return 0
    return T if bool((metadata.seq_lens > T).all()) else 0


def _select(settings: Settings, q, key_cache, block_table, seq_lens, T: int, scale: float):
    """Dustin's selection from the window queries q [B, Hq, T, D] of the target layer's retrieval heads."""
    from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_reduce

    from .. import attention_scores_paged, select_tokens
    from ..distributed import local_heads

    heads = local_heads(settings.target_heads, get_tensor_model_parallel_rank(), q.shape[1])
    scores = attention_scores_paged(q, key_cache, block_table, seq_lens, heads=heads, scale=scale)
    scores = tensor_model_parallel_all_reduce(scores)
    return select_tokens(None, scores, seq_lens, budget=settings.budget, m=0, sink=settings.sink,
                         recent=settings.recent, window=T)


@functools.cache
def _announce(settings: Settings) -> None:
    print(f"dustin_kernels vLLM plugin: sparse verification from target layer {settings.target_layer}, budget "
          f"{settings.budget} history tokens", file=sys.stderr, flush=True)


def wrap(impl_cls: type) -> type:
    """A subclass of vLLM's attention implementation `impl_cls` whose `forward` runs the target's
    verification layers through Dustin's selection (module docstring) and delegates everything else."""

    class DustinImpl(impl_cls):
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            global _step
            settings = Settings.from_env()
            match = TARGET_LAYER.match(getattr(layer, "layer_name", ""))
            if (settings.policy == "dense" or match is None or attn_metadata is None or args or any(kwargs.values())
                    or int(match[1]) < settings.target_layer or self.kv_cache_dtype != "auto"
                    or getattr(layer, "isa", None) != "vec"  # the one cache layout read here
                    or getattr(self, "sliding_window", -1) not in (-1, None) or self.alibi_slopes is not None
                    or getattr(self, "sinks", None) is not None or self.logits_soft_cap):
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if _step is None or _step.metadata is not attn_metadata:
                _step = Step(attn_metadata)
            T = _verification_rows(attn_metadata)
            if not T:
                return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            from .. import sparse_verify_paged, trusted_inputs

            n, Hq, D = attn_metadata.num_actual_tokens, query.shape[1], query.shape[2]
            q = query[:n].view(-1, T, Hq, D).transpose(1, 2)  # [B, Hq, T, D]
            key_cache, value_cache = split_cpu_cache(kv_cache)
            seq_lens, block_table = attn_metadata.seq_lens.int(), attn_metadata.block_table.int()
            with trusted_inputs():  # vLLM's own lengths and tables
                if int(match[1]) == settings.target_layer or _step.selection is None:
                    _step.selection = _select(settings, q, key_cache, block_table, seq_lens, T, self.scale)
                    _announce(settings)
                idx, count = _step.selection
                out = sparse_verify_paged(q, key_cache, value_cache, block_table, seq_lens, idx, count, scale=self.scale)
            output[:n].copy_(out.transpose(1, 2).reshape(n, Hq, -1))
            return output

    return DustinImpl


class DustinCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with Dustin's verification (module docstring)."""

    @staticmethod
    def get_impl_cls():
        return DustinCPUAttentionBackendImpl


DustinCPUAttentionBackendImpl = wrap(CPUAttentionBackendImpl)


def register() -> None:
    """The entry point vLLM calls in each process: its CPU backend becomes `DustinCPUAttentionBackend`."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.DustinCPUAttentionBackend")
