"""Verification policies: which history tokens the target attends to at a speculative step.

A policy is a small object with one method, `attention(ctx) -> StepAttention`: the target's attention
for one verification pass, called by its layers in order with the ops' contract. Most policies choose
one selection per step, shared by every target layer (`select(ctx) -> (idx, count) | None`, None: dense);
a refining policy replaces it from a layer's own window queries. Two attributes name the queries the
driver must capture for it: `draft_heads` / `target_heads`, dicts {layer: q-head indices}.

- `dense`: plain speculative decoding, every history token.
- `dustin`: sink + recent, then the top m by the draft lookahead S_draft (the draft's queries of the T
  window tokens on its retrieval heads, summed over its retrieval layers), then the rest of the budget
  by the target: the layers before the target's retrieval layer read sink + recent + the draft's choice
  (the draft fills the budget); at the retrieval layer the T window queries of its retrieval heads
  score the history (the K bytes the paper's estimation reads) and the selection is redone with them;
  that layer and the later ones read the refined selection.
- `dustin-paper`: the paper's rule, one selection for every layer, the target signal S_target being
  the target's last committed query on its retrieval heads, scored over the full history.
- `draft-only` / `target-only`: the paper's rule with one signal filling the whole free budget.
- `streaming`: StreamingLLM, the `sink` first and the `budget - sink` last history tokens.
- `quest`: Quest-style pages of 16 tokens, chosen in every layer by an upper bound of q.k from each
  page's per-dimension min / max keys, aggregated over the layer's heads and window rows.

Retrieval heads and layers come from a calibration profile (`python -m dustin_kernels.calibrate`);
without one, `RetrievalProfile.default`: every q head of the draft layers at 1/4, 1/2 and 3/4 of its
depth and of the target layer at 1/2 of its depth, m = budget // 4.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch.autograd.profiler import record_function

from . import VerifyPlan, attention_scores, attention_scores_layers, dense_verify, select_tokens, sparse_verify
from .measurement import used_kv_heads
from .models import KVCache, ModelConfig
from .ops.scores import MAX_LAYERS

# torch.profiler ranges of a speculative step (`tools/bench_e2e.py` reads them): the draft passes, the
# first selection, the target's pass, and within it the refinement and every layer's attention.
PHASES = {name: f"dustin.{name}" for name in ("draft", "select", "target", "refine", "attention")}
POLICIES = ("dense", "dustin", "dustin-paper", "draft-only", "target-only", "streaming", "quest")
TARGET_SIGNAL = ("dustin", "dustin-paper", "target-only")  # policies with a target signal to estimate
PROFILE_FORMAT = "dustin-profile/1"


def phase(name: str):
    """The profiler range of the step's phase `name` (none while compiling: torch.compile drops such ranges)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else record_function(PHASES[name])


@dataclasses.dataclass
class VerifyContext:
    """What a policy may read at one speculative step (T = gamma + 1 window tokens).

    lens: int32[B] history tokens (cache entries before the window); draft_queries: {draft layer:
    [B, Hq, T, D]} the draft's queries of the T window tokens (positions lens .. lens + gamma);
    draft_lse: {draft layer: float32[B, Hq, T]} the log-sum-exp of those rows' attention, kept by the
    draft's own passes (`DraftAttention`); draft_cache: holds the window already; target_queries:
    {target layer: [B, Hq, 1, D]} query of the last committed token (position lens - 1); target_cache:
    history only. estimate: whether this step estimates the target signal afresh; target_scores:
    float32[B, blocks] the last estimate (None before the first), which a policy that re-estimates every
    k steps reuses in between.
    """
    lens: torch.Tensor
    window: int
    draft_queries: dict[int, torch.Tensor]
    draft_lse: dict[int, torch.Tensor]
    draft_cache: KVCache
    target_queries: dict[int, torch.Tensor]
    target_cache: KVCache
    estimate: bool = True
    target_scores: torch.Tensor | None = None

    @property
    def reuse(self) -> bool:
        """This step reuses the last estimate of the target signal."""
        return not self.estimate and self.target_scores is not None


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


def history_read(selection, lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64[B]: history tokens a selection covers (a last block may be partial); None: all of them."""
    if selection is None:
        return lens.long()
    idx, count = selection
    used = torch.arange(idx.shape[1], device=idx.device)[None] < count[:, None]
    start = idx.long().clamp(min=0) * block_size
    return torch.where(used, (lens.long()[:, None] - start).clamp(0, block_size), 0).sum(1)


class DraftAttention:
    """The draft's dense attention for one forward pass (called by its layers in order, the ops'
    contract) that keeps, for the layers in `layers`, each query row's log-sum-exp: `lse` {layer:
    float32[B, Hq, T]}. The draft lookahead then scores the history with it (one read of K), no
    second pass over the keys for the softmax normaliser."""

    def __init__(self, layers):
        self.layers, self.lse, self._next = set(layers), {}, 0

    def __call__(self, q, k_cache, v_cache, seq_lens):
        layer, self._next = self._next, self._next + 1
        if layer not in self.layers:
            return dense_verify(q, k_cache, v_cache, seq_lens)
        out, self.lse[layer] = dense_verify(q, k_cache, v_cache, seq_lens, return_lse=True)
        return out


class StepAttention:
    """The target's attention at one verification step, called by its layers in order with the ops'
    contract `(q, k_cache, v_cache, seq_lens, return_lse=False)`: each layer attends to the current
    selection (sparse verification; None: dense). `refine(layer, q, k_cache, seq_lens, selection)`,
    when given, returns the selection for this layer and the next ones. In eager mode a `VerifyPlan`
    made at the first layer (and again where a refinement changes the selection) serves every layer, so
    a layer only launches; under torch.compile the layers call the ops (custom ops). `read`: history
    tokens read per layer, int64[B] each. `target_scores`: the target signal this step's selection used,
    float32[B, blocks] (None without one), kept by the driver for the steps that reuse it."""

    def __init__(self, lens: torch.Tensor, block_size: int = 1, selection=None, refine=None, target_scores=None):
        self.lens, self.block_size, self.selection, self.refine = lens, block_size, selection, refine
        self.target_scores = target_scores
        self.read: list[torch.Tensor] = []
        self._plan, self._planned = None, None  # the plan and the selection it was made for

    @property
    def dense(self) -> bool:
        """Every layer attends to the whole history."""
        return self.selection is None and self.refine is None

    def __call__(self, q, k_cache, v_cache, seq_lens, return_lse=False):
        if self.refine is not None:
            with phase("refine"):
                self.selection = self.refine(len(self.read), q, k_cache, seq_lens, self.selection)
        self.read.append(history_read(self.selection, self.lens, self.block_size))
        with phase("attention"):
            if torch.compiler.is_compiling():
                if self.selection is None:
                    return dense_verify(q, k_cache, v_cache, seq_lens, return_lse=return_lse)
                return sparse_verify(q, k_cache, v_cache, seq_lens, *self.selection, block_size=self.block_size,
                                     return_lse=return_lse)
            if self._plan is None or self._planned is not self.selection:
                self._plan = VerifyPlan(q, k_cache, v_cache, seq_lens, *(self.selection or ()),
                                        block_size=self.block_size)
                self._planned = self.selection
            out = self._plan.run(q, k_cache, v_cache)  # the plan's buffer: the layer consumes it at once
            return (out, self._plan.lse) if return_lse else out


def key_bytes(config: ModelConfig, heads_of: dict, tokens: torch.Tensor, itemsize: int) -> torch.Tensor:
    """K bytes (an int64 scalar on tokens' device: no host sync) that scoring `tokens` [B] keys per
    sequence reads for the KV heads that the q heads of `heads_of` {layer: q heads} use."""
    group = config.num_heads // config.num_kv_heads
    kv_heads = sum(used_kv_heads(heads, group) for heads in heads_of.values())
    return kv_heads * config.head_dim * itemsize * tokens.long().sum()


class Policy:
    """What every policy does with its one selection per step (`select`); no scores by default."""
    estimate_every = 1

    def select(self, ctx: VerifyContext):
        return None

    def attention(self, ctx: VerifyContext) -> StepAttention:
        return StepAttention(ctx.lens, self.block_size, self.select(ctx))

    def estimates(self, step: int) -> bool:
        """Whether step `step` (0, 1, ...) of a generation estimates the target signal afresh."""
        return step % self.estimate_every == 0

    def score_bytes(self, draft, target, lens, window: int, active, estimate: bool = True) -> torch.Tensor:
        """K bytes the policy's scores read at a step (active sequences), an int64 scalar on lens' device;
        estimate: whether the step estimates the target signal afresh."""
        return torch.zeros((), dtype=torch.long, device=lens.device)


class Dense(Policy):
    """Plain speculative decoding: the target attends to its whole history."""
    name = "dense"
    block_size = 1
    draft_heads = {}
    target_heads = {}


def no_scores(ctx: VerifyContext, block_size: int) -> torch.Tensor:
    """float32[B, blocks of the cache] of zeros: a score row that prefers no block (ties: lower block)."""
    return torch.zeros(ctx.lens.shape[0], -(-ctx.target_cache.max_len // block_size), device=ctx.lens.device)


def _check_budget(budget, sink, recent) -> None:
    for name, value in (("budget", budget), ("sink", sink), ("recent", recent)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    if budget < sink + recent or budget < 1:
        raise ValueError(f"budget: expected at least sink + recent = {sink + recent} (and >= 1), got {budget}")


@dataclasses.dataclass(frozen=True)
class Dustin(Policy):
    """Dustin's selection. refine=False: the paper's rule (also `draft-only` / `target-only` when one of
    the head dicts is empty). refine=True: the target signal comes from the window queries of its
    retrieval layer (one entry in target_heads), inside the verification pass. estimate_every k: the
    target signal (the full-history read of its retrieval layer) is estimated at every k-th step; the
    steps between select once, before the target's pass, from the fresh draft signal and the last
    estimate (history written since then scores 0 there: `recent` keeps its last blocks)."""
    draft_heads: dict[int, tuple[int, ...]]
    target_heads: dict[int, tuple[int, ...]]
    budget: int = 512
    m: int = 128
    sink: int = 4
    recent: int = 16
    block_size: int = 1
    name: str = "dustin"
    refine: bool = False
    estimate_every: int = 1

    def __post_init__(self):
        _check_budget(self.budget, self.sink, self.recent)
        if not isinstance(self.estimate_every, int) or isinstance(self.estimate_every, bool) or self.estimate_every < 1:
            raise ValueError(f"estimate_every: expected an int >= 1 (steps per target estimation), got "
                             f"{self.estimate_every!r}")
        if not isinstance(self.m, int) or not 0 <= self.m <= self.budget:
            raise ValueError(f"m: expected an int in [0, budget={self.budget}], got {self.m!r}")
        if not self.draft_heads and not self.target_heads:
            raise ValueError("draft_heads, target_heads: at least one signal needs retrieval heads")
        if self.refine and len(self.target_heads) != 1:
            raise ValueError(f"target_heads: refining reads one target layer, got {sorted(self.target_heads)}")

    def _select(self, s_draft, s_target, seq_lens, window: int):
        return select_tokens(s_draft, s_target, seq_lens, budget=self.budget, m=self.m, sink=self.sink,
                             recent=self.recent, window=window, block_size=self.block_size)

    def draft_scores(self, ctx: VerifyContext):
        """S_draft float32[B, blocks] (None without draft heads): the draft's T window queries on its
        retrieval heads, every retrieval layer in one launch, normalised by the log-sum-exp the draft's
        own attention kept (so its keys are read once)."""
        s_draft, layers = None, list(self.draft_heads)
        for at in range(0, len(layers), MAX_LAYERS):  # one launch per MAX_LAYERS (8) layers
            part = layers[at:at + MAX_LAYERS]
            s = attention_scores_layers([ctx.draft_queries[i] for i in part], [ctx.draft_cache.k[i] for i in part],
                                        ctx.lens + ctx.window, heads=[self.draft_heads[i] for i in part],
                                        lses=[ctx.draft_lse[i] for i in part], block_size=self.block_size)
            s_draft = s if s_draft is None else s_draft + s
        return s_draft

    def target_scores(self, ctx: VerifyContext):
        """S_target float32[B, blocks] of the paper's rule (None without target heads): the last committed
        query over the full history, or the last estimate on a step that reuses it."""
        if ctx.reuse:
            return ctx.target_scores
        s_target = None
        for layer, heads in self.target_heads.items():
            # the committed query sits at lens - 1; a sequence without history has nothing to select
            s = attention_scores(ctx.target_queries[layer], ctx.target_cache.k[layer], ctx.lens.clamp(min=1),
                                 heads=heads, block_size=self.block_size)
            s_target = s if s_target is None else s_target + s
        return s_target

    def select(self, ctx: VerifyContext):
        """The first selection (the only one without refine, or on a step that reuses the last estimate)."""
        return self.attention(ctx).selection

    def attention(self, ctx: VerifyContext) -> StepAttention:
        if not self.refine or ctx.reuse:
            s_target = self.target_scores(ctx)
            selection = self._select(self.draft_scores(ctx), s_target, ctx.lens + ctx.window, ctx.window)
            return StepAttention(ctx.lens, self.block_size, selection, target_scores=s_target)
        s_draft = self.draft_scores(ctx)
        ((at, heads),) = self.target_heads.items()

        def refine(layer, q, k_cache, seq_lens, selection):
            if layer != at:
                return selection
            step.target_scores = attention_scores(q, k_cache, seq_lens, heads=heads, block_size=self.block_size)
            return self._select(s_draft, step.target_scores, seq_lens, ctx.window)

        first = self._select(s_draft, None if s_draft is not None else no_scores(ctx, self.block_size),
                             ctx.lens + ctx.window, ctx.window)  # sink + recent + the draft's choice
        step = StepAttention(ctx.lens, self.block_size, first, refine)
        return step

    def score_bytes(self, draft, target, lens, window: int, active, estimate: bool = True) -> torch.Tensor:
        """The draft's retrieval layers over history + window, the target's over the history (when the step
        estimates it)."""
        lens = lens.long() * active
        draft_bytes = key_bytes(draft.config, self.draft_heads, lens + window * active, draft.dtype.itemsize)
        return draft_bytes + key_bytes(target.config, self.target_heads if estimate else {}, lens,
                                       target.dtype.itemsize)


@dataclasses.dataclass(frozen=True)
class Streaming(Policy):
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
        return select_tokens(None, no_scores(ctx, self.block_size), ctx.lens + ctx.window, budget=self.budget, m=0,
                             sink=self.sink, recent=self.budget - self.sink, window=ctx.window,
                             block_size=self.block_size)


@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """Quest (Tang et al., 2024), shared over heads: in every layer, pages of `block_size` history
    tokens ranked by the upper bound sum_d max(q_d * kmin_d, q_d * kmax_d) of q.k over the page, as a
    softmax over pages per (q head, window row) summed over them; the top `budget` pages, the last
    (partial) page always among them. Page min / max keys are kept up to date by a real implementation
    (2 vectors per page and KV head, counted in score_bytes); here they are computed from the cache."""
    budget: int = 32
    block_size: int = 16
    name: str = "quest"
    draft_heads = {}
    target_heads = {}

    def __post_init__(self):
        _check_budget(self.budget, 0, 1)

    def attention(self, ctx: VerifyContext) -> StepAttention:
        def select(layer, q, k_cache, seq_lens, selection):
            scores = page_bounds(q, k_cache, ctx.lens, self.block_size)
            return select_tokens(None, scores, seq_lens, budget=self.budget, m=0, sink=0, recent=1,
                                 window=ctx.window, block_size=self.block_size)

        return StepAttention(ctx.lens, self.block_size, None, select)

    def score_bytes(self, draft, target, lens, window: int, active, estimate: bool = True) -> torch.Tensor:
        pages = -(-lens.long() * active // self.block_size)
        c = target.config
        return 2 * c.num_layers * key_bytes(c, {0: range(c.num_heads)}, pages, target.dtype.itemsize)


def page_bounds(q, k_cache, lens, page: int) -> torch.Tensor:
    """float32[B, ceil(N_max / page)]: Quest's page scores. q [B, Hq, T, D]; keys at positions >= lens[b]
    (the window, stale entries) are not part of any page."""
    B, Hq, T, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    pages = -(-N // page)
    valid = (torch.arange(pages * page, device=q.device)[None] < lens.long()[:, None]).view(B, 1, pages, page, 1)
    k = torch.nn.functional.pad(k_cache.float(), (0, 0, 0, pages * page - N)).view(B, Hkv, pages, page, D)
    kmax = torch.where(valid, k, -torch.inf).amax(3)  # [B, Hkv, pages, D]
    kmin = torch.where(valid, k, torch.inf).amin(3)
    qf = q.float().reshape(B, Hkv, Hq // Hkv * T, 1, D)
    bound = torch.maximum(qf * kmax[:, :, None], qf * kmin[:, :, None]).sum(-1) * D ** -0.5  # [B, Hkv, G*T, pages]
    bound = bound.masked_fill(~valid.view(B, 1, 1, pages, page).any(-1), -torch.inf)  # pages without history
    return torch.softmax(bound, -1).nan_to_num(0.0).sum((1, 2))


def make_policy(name: str, profile: RetrievalProfile | None = None, *, budget: int = 512, m: int | None = None,
                sink: int = 4, recent: int = 16, block_size: int = 1, estimate_every: int = 1):
    """The policy `name` (one of POLICIES); budget, m, sink, recent count blocks of block_size tokens
    (quest: pages of 16 tokens, budget // 16 of them). m defaults to the profile's, else budget // 4.
    `profile` is needed by the dustin variants, draft-only and target-only; estimate_every (steps per
    estimation of the target signal) applies to dustin, dustin-paper and target-only."""
    if name not in POLICIES:
        raise ValueError(f"policy: expected one of {', '.join(POLICIES)}, got {name!r}")
    if estimate_every != 1 and name not in TARGET_SIGNAL:
        raise ValueError(f"estimate_every: policy {name!r} has no target signal to re-estimate (only "
                         f"{', '.join(TARGET_SIGNAL)}), got {estimate_every!r}")
    if name == "dense":
        return Dense()
    if name == "streaming":
        return Streaming(budget, sink, block_size)
    if name == "quest":
        return Quest(max(budget * block_size // 16, 1))
    _check_budget(budget, sink, recent)
    if profile is None:
        raise ValueError(f"profile: policy {name!r} needs retrieval heads (RetrievalProfile)")
    m = m if m is not None else profile.m if profile.m is not None else budget // 4
    draft = profile.draft_heads if name != "target-only" else {}
    target = {profile.target_layer: profile.target_heads} if name != "draft-only" else {}
    return Dustin(draft, target, budget, m, sink, recent, block_size, name, refine=name == "dustin",
                  estimate_every=estimate_every)
