"""Verification policies: which history tokens the target attends to at a speculative step.

A policy is a small object with one method, `select(ctx) -> (idx, count) | None` (None: dense
verification), and two attributes naming the queries the driver must capture for it:
`draft_heads` / `target_heads`, dicts {layer: q-head indices}. The index it returns is shared by every
target layer (one `sparse_verify` per layer with the same `idx`, `count`).

- `dense`: plain speculative decoding, every history token.
- `dustin`: sink + recent, then the top m by the draft lookahead S_draft (the draft's gamma speculated
  queries on its retrieval heads, summed over its retrieval layers), then the rest of the budget by the
  target history S_target (the target's last committed query on the retrieval heads of one layer,
  scored over the full history for those heads only).
- `draft-only` / `target-only`: the same with one signal filling the whole free budget.
- `streaming`: StreamingLLM, the `sink` first and the `budget - sink` last history tokens.

Retrieval heads and layers come from a calibration profile (`python -m dustin_kernels.calibrate`);
without one, `RetrievalProfile.default`: every q head of the draft layers at 1/4, 1/2 and 3/4 of its
depth and of the target layer at 1/2 of its depth, m = budget // 4.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from . import attention_scores, select_tokens
from .models import KVCache, ModelConfig

POLICIES = ("dense", "dustin", "draft-only", "target-only", "streaming")
PROFILE_FORMAT = "dustin-profile/1"


@dataclasses.dataclass
class VerifyContext:
    """What a policy may read at one speculative step (T = gamma + 1 window tokens).

    lens: int32[B] history tokens (cache entries before the window); draft_queries: {draft layer:
    [B, Hq, gamma, D]} queries of the gamma speculated tokens (positions lens + 1 .. lens + gamma);
    draft_cache: holds the window already; target_queries: {target layer: [B, Hq, 1, D]} query of the
    last committed token (position lens - 1); target_cache: history only.
    """
    lens: torch.Tensor
    window: int
    draft_queries: dict[int, torch.Tensor]
    draft_cache: KVCache
    target_queries: dict[int, torch.Tensor]
    target_cache: KVCache


@dataclasses.dataclass(frozen=True)
class RetrievalProfile:
    """Retrieval heads of a model pair: {draft layer: q heads}, one target layer and its q heads, m."""
    draft_heads: dict[int, tuple[int, ...]]
    target_layer: int
    target_heads: tuple[int, ...]
    m: int | None = None
    source: str = "default"

    @classmethod
    def default(cls, draft: ModelConfig, target: ModelConfig) -> "RetrievalProfile":
        """Every q head of the draft layers at 1/4, 1/2, 3/4 depth and of the target layer at 1/2 depth."""
        layers = sorted({draft.num_layers * i // 4 for i in (1, 2, 3)})
        return cls({layer: tuple(range(draft.num_heads)) for layer in layers}, target.num_layers // 2,
                   tuple(range(target.num_heads)))

    @classmethod
    def load(cls, path, draft: ModelConfig, target: ModelConfig) -> "RetrievalProfile":
        """A profile JSON written by `python -m dustin_kernels.calibrate`, checked against the models."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such profile file")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON profile ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{path}: not a {PROFILE_FORMAT} profile (format {found!r})")
        try:
            profile = cls({int(k): tuple(map(int, v)) for k, v in data["draft_heads"].items()},
                          int(data["target_layer"]), tuple(map(int, data["target_heads"])), data.get("m"), str(path))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: malformed {PROFILE_FORMAT} profile ({type(exc).__name__}: {exc}); expected "
                             "draft_heads {layer: [q heads]}, target_layer, target_heads [q heads]") from None
        for who, cfg, heads in [("draft", draft, profile.draft_heads),
                                ("target", target, {profile.target_layer: profile.target_heads})]:
            for layer, hs in heads.items():
                if not 0 <= layer < cfg.num_layers or not hs or not all(0 <= h < cfg.num_heads for h in hs):
                    raise ValueError(f"{path}: {who} layer {layer} heads {list(hs)} do not fit the {who} model "
                                     f"({cfg.num_layers} layers x {cfg.num_heads} heads)")
        return profile

    def to_json(self, **extra) -> dict:
        return {"format": PROFILE_FORMAT, "draft_heads": {str(k): list(v) for k, v in self.draft_heads.items()},
                "target_layer": self.target_layer, "target_heads": list(self.target_heads), "m": self.m, **extra}


class Dense:
    """Plain speculative decoding: the target attends to its whole history."""
    name = "dense"
    block_size = 1
    draft_heads: dict = {}
    target_heads: dict = {}

    def select(self, ctx: VerifyContext):
        return None


def _check_budget(budget, sink, recent) -> None:
    for name, value in (("budget", budget), ("sink", sink), ("recent", recent)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    if budget < sink + recent or budget < 1:
        raise ValueError(f"budget: expected at least sink + recent = {sink + recent} (and >= 1), got {budget}")


@dataclasses.dataclass(frozen=True)
class Dustin:
    """Dustin's selection (also `draft-only` / `target-only` when one of the head dicts is empty)."""
    draft_heads: dict[int, tuple[int, ...]]
    target_heads: dict[int, tuple[int, ...]]
    budget: int = 512
    m: int = 128
    sink: int = 4
    recent: int = 16
    block_size: int = 1
    name: str = "dustin"

    def __post_init__(self):
        _check_budget(self.budget, self.sink, self.recent)
        if not isinstance(self.m, int) or not 0 <= self.m <= self.budget:
            raise ValueError(f"m: expected an int in [0, budget={self.budget}], got {self.m!r}")
        if not self.draft_heads and not self.target_heads:
            raise ValueError("draft_heads, target_heads: at least one signal needs retrieval heads")

    def select(self, ctx: VerifyContext):
        seq_lens = ctx.lens + ctx.window
        bs = self.block_size
        s_draft = s_target = None
        for layer, heads in self.draft_heads.items():
            s = attention_scores(ctx.draft_queries[layer], ctx.draft_cache.k[layer], seq_lens, heads=heads,
                                 block_size=bs)
            s_draft = s if s_draft is None else s_draft + s
        for layer, heads in self.target_heads.items():
            # the committed query sits at lens - 1; a sequence without history has nothing to select
            s = attention_scores(ctx.target_queries[layer], ctx.target_cache.k[layer], ctx.lens.clamp(min=1),
                                 heads=heads, block_size=bs)
            s_target = s if s_target is None else s_target + s
        return select_tokens(s_draft, s_target, seq_lens, budget=self.budget, m=self.m, sink=self.sink,
                             recent=self.recent, window=ctx.window, block_size=bs)


@dataclasses.dataclass(frozen=True)
class Streaming:
    """StreamingLLM: the `sink` first and the `budget - sink` last history tokens."""
    budget: int = 512
    sink: int = 4
    block_size: int = 1
    name: str = "streaming"
    draft_heads = {}
    target_heads = {}

    def __post_init__(self):
        _check_budget(self.budget, self.sink, 0)

    def select(self, ctx: VerifyContext):
        seq_lens = ctx.lens + ctx.window
        blocks = -(-ctx.target_cache.max_len // self.block_size)
        zeros = torch.zeros(seq_lens.shape[0], blocks, device=seq_lens.device)
        return select_tokens(None, zeros, seq_lens, budget=self.budget, m=0, sink=self.sink,
                             recent=self.budget - self.sink, window=ctx.window, block_size=self.block_size)


def make_policy(name: str, profile: RetrievalProfile | None = None, *, budget: int = 512, m: int | None = None,
                sink: int = 4, recent: int = 16, block_size: int = 1):
    """The policy `name` (one of POLICIES); budget, m, sink, recent count blocks of block_size tokens.
    m defaults to the profile's, else budget // 4. `profile` is needed by dustin / draft-only / target-only."""
    if name not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {name!r}")
    if name == "dense":
        return Dense()
    if name == "streaming":
        return Streaming(budget, sink, block_size)
    _check_budget(budget, sink, recent)
    if profile is None:
        raise ValueError(f"profile: policy {name!r} needs retrieval heads (RetrievalProfile)")
    m = m if m is not None else profile.m if profile.m is not None else budget // 4
    draft = profile.draft_heads if name != "target-only" else {}
    target = {profile.target_layer: profile.target_heads} if name != "draft-only" else {}
    return Dustin(draft, target, budget, m, sink, recent, block_size, name)
