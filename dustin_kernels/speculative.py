"""Speculative decoding for a batch of ragged prompts, the target verifying through a policy.

Both caches hold the committed tokens of each sequence at positions [0, lens[b]) (no padding in the
caches: prompts are right-padded only in the prefill input, and each sequence has its own positions).
The last committed token, `pending`, is not in the caches yet. One step (`speculative_step`):

1. the draft runs gamma + 1 single-token passes from `pending`, proposing d_1 .. d_gamma (the last
   pass writes d_gamma's K/V); the passes yield the draft's queries of all T = gamma + 1 window tokens;
2. the policy chooses the history the target reads (`policies.py`); the target runs one pass over
   the window [pending, d_1 .. d_gamma], each layer through `dense_verify` or `sparse_verify`;
3. acceptance: greedy (longest prefix where d_i equals the target's argmax, then the target's token)
   or sampling (accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw
   from the residual norm(max(0, p_i - q_i)); after gamma acceptances draw from p_{gamma+1}, the
   target's distribution after d_gamma), per sequence;
4. rollback by length: lens += accepted + 1 (pending and the accepted drafts are now committed); the
   new token becomes `pending`. Cache entries past lens are stale and never read.

Finished sequences (EOS, or their max_new_tokens) stay in the batch, inactive: `generate` parks them
at length 0 (their caches are no longer needed, so they cost a window's attention). Plain decoding
is `draft=None, gamma=0` (the target alone, one token per step). Logits are cut to the smaller of the
two vocab_size (rows past it are padding).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple, Sequence

import torch

from . import dense_verify, trusted_inputs
from .fidelity import Probe
from .models import KVCache, Transformer
from .policies import Dense, DraftAttention, VerifyContext, phase


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0: greedy; else softmax(logits / temperature) cut to the top-p nucleus."""
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: expected a value in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p  # mass before it already reaches top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def noise(self, batch: int, gamma: int, device: torch.device) -> torch.Tensor:
        """float32[B, 2 * gamma + 1] uniforms in [0, 1) for one step, from `generator`: the gamma draft draws,
        the gamma acceptance tests, the final draw. Drawn outside the step, so a compiled step stays one graph
        and gives the eager step's tokens for the same seed."""
        return torch.rand(batch, 2 * gamma + 1, generator=self.generator, device=device)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: int64[B] tokens distributed as probs [B, V], one uniform u [B] in [0, 1) per row; never
    a token of probability 0 (the point drawn stays below the total mass)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    point = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True)[:, 0]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where to draw after rejecting a draft token (p where p == q)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """drafts int64[B, gamma], target_logits [B, gamma + 1, V] -> (accepted int64[B], next token int64[B])."""
    best = target_logits.argmax(-1)
    n = (drafts == best[:, :-1]).long().cumprod(1).sum(1)
    return n, best.gather(1, n[:, None])[:, 0]


def accept_sampling(drafts, draft_probs, target_probs, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling: drafts int64[B, gamma] drawn from draft_probs [B, gamma, V]; target_probs
    [B, gamma + 1, V]; noise float32[B, gamma + 1] uniforms independent of the drafts' (gamma acceptance tests,
    then the draw). Returns (accepted int64[B], next token int64[B]) distributed as the target."""
    B, gamma = drafts.shape
    p = target_probs[:, :gamma].gather(2, drafts[..., None])[..., 0]
    q = draft_probs.gather(2, drafts[..., None])[..., 0]
    n = (noise[:, :gamma] * q < p).long().cumprod(1).sum(1)
    rows = torch.arange(B, device=drafts.device)
    q_next = torch.cat([draft_probs, torch.zeros_like(target_probs[:, :1])], 1)[rows, n]  # zeros after gamma
    return n, sample(residual(target_probs[rows, n], q_next), noise[:, gamma])


@dataclasses.dataclass
class State:
    """Per sequence: lens int32[B] committed tokens in both caches; pending int64[B] the last committed
    token (not in the caches); target_queries {layer: [B, Hq, 1, D]} the query of the token at lens - 1
    (for the policy's S_target); active bool[B]; estimate: whether the next step estimates the target
    signal afresh (`Policy.estimates`); target_scores: float32[B, blocks] the policy's last estimate (or None).
    """
    lens: torch.Tensor
    pending: torch.Tensor
    target_queries: dict[int, torch.Tensor]
    active: torch.Tensor
    estimate: bool = True
    target_scores: torch.Tensor | None = None

    def cloned(self) -> State:
        """A copy of the tensors: a compiled step's outputs live in its CUDA graph's memory, which the next
        replay overwrites, so the state carried into that step must not be them."""
        return dataclasses.replace(
            self, lens=self.lens.clone(), pending=self.pending.clone(), active=self.active.clone(),
            target_queries={layer: q.clone() for layer, q in self.target_queries.items()},
            target_scores=None if self.target_scores is None else self.target_scores.clone())


class Step(NamedTuple):
    tokens: torch.Tensor  # int64[B, gamma + 1]: accepted drafts then the target's token; first counts[b] valid
    counts: torch.Tensor  # int64[B]: tokens emitted (accepted + 1; 0 for finished sequences)
    state: State
    read_tokens: torch.Tensor  # int64 scalar: history + window tokens the verification read, summed over target
    dense_tokens: torch.Tensor  # layers (active sequences); the same for dense verification. On the device


def start(draft: Transformer | None, target: Transformer, prompts: Sequence[Sequence[int]], max_len: int,
          policy=Dense(), *, chunk: int | None = None) -> tuple[KVCache | None, KVCache, State]:
    """Allocate both caches (`max_len` positions) and prefill all but the last prompt token of each
    sequence (the last one becomes `pending`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one non-empty prompt (a list of token ids each)")
    B, device = len(prompts), target.device
    longest = max(len(p) for p in prompts)
    if longest > max_len:
        raise ValueError(f"prompts: a prompt of {longest} tokens is longer than the cache of {max_len} positions")
    tokens = torch.zeros(B, longest - 1, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
    lengths = torch.tensor([len(p) - 1 for p in prompts], device=device)
    target_cache = target.new_cache(B, max_len)
    _, queries = target.prefill(tokens, lengths, target_cache, chunk=chunk, capture=policy.target_heads)
    draft_cache = None
    if draft is not None:
        draft_cache = draft.new_cache(B, max_len)
        draft.prefill(tokens, lengths, draft_cache, chunk=chunk)
    pending = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
    state = State(lengths.to(torch.int32), pending, queries, torch.ones(B, dtype=torch.bool, device=device))
    return draft_cache, target_cache, state


@torch.no_grad()
@trusted_inputs()  # lengths and selections are built by this driver: no per-layer host syncs to check them
def speculative_step(draft: Transformer | None, target: Transformer, draft_cache: KVCache | None,
                     target_cache: KVCache, state: State, policy=Dense(), sampler: Sampler = Sampler(),
                     gamma: int = 4, probe: Probe | None = None, noise: torch.Tensor | None = None) -> Step:
    """One draft-propose / target-verify / accept step for the whole batch; returns tokens and counts.
    probe: records the sparse verification's fidelity against dense verification (`fidelity.py`).
    noise: the step's uniforms when sampling (`Sampler.noise`; drawn here when None)."""
    T = gamma + 1
    lens = state.lens
    if not sampler.greedy and noise is None:
        noise = sampler.noise(len(lens), gamma, lens.device)
    vocab = target.config.vocab_size if draft is None else min(target.config.vocab_size, draft.config.vocab_size)
    token = state.pending[:, None]
    drafts, draft_probs = [], []
    draft_queries, draft_lse = {layer: [] for layer in policy.draft_heads}, {layer: [] for layer in policy.draft_heads}
    with phase("draft"):
        for i in range(T if gamma else 0):
            attend = DraftAttention(policy.draft_heads)
            hidden, queries = draft(token, draft_cache, lens + i, attend=attend, capture=policy.draft_heads)
            for layer, q in queries.items():  # S_draft covers every verified row: pending, d_1 .. d_gamma
                draft_queries[layer].append(q)
                draft_lse[layer].append(attend.lse[layer])
            if i == gamma:
                break
            logits = draft.logits(hidden[:, -1])[:, :vocab]
            if sampler.greedy:
                token = logits.argmax(-1, keepdim=True)
            else:
                draft_probs.append(sampler.probs(logits))
                token = sample(draft_probs[-1], noise[:, i])[:, None]
            drafts.append(token)
    drafts = torch.cat(drafts, 1) if drafts else state.pending.new_zeros(len(lens), 0)

    ctx = VerifyContext(lens, T, {k: torch.cat(v, 2) for k, v in draft_queries.items()},
                        {k: torch.cat(v, 2) for k, v in draft_lse.items()}, draft_cache, state.target_queries,
                        target_cache, state.estimate, state.target_scores)
    with phase("select"):
        attention = policy.attention(ctx)
    window = torch.cat([state.pending[:, None], drafts], 1)
    probed = probe is not None and not attention.dense
    attend = attention
    if probed:  # the dense pass first: the sparse one rewrites the window's K/V
        dense_hidden, _ = target(window, target_cache, lens, attend=dense_verify)
        probe.begin(attention, state.active)
        attend = probe.attend
    with phase("target"):
        hidden, queries = target(window, target_cache, lens, attend=attend, capture=policy.target_heads)
        logits = target.logits(hidden)[..., :vocab]
    if probed:
        probe.compare_tokens(logits, target.logits(dense_hidden)[..., :vocab], state.active)

    if sampler.greedy:
        n, nxt = accept_greedy(drafts, logits)
    else:
        probs = torch.stack(draft_probs, 1) if draft_probs else logits.new_zeros(len(lens), 0, vocab)
        n, nxt = accept_sampling(drafts, probs, sampler.probs(logits), noise[:, gamma:])
    rows = torch.arange(len(lens), device=lens.device)
    tokens = torch.cat([drafts, torch.zeros_like(nxt)[:, None]], 1)
    tokens[rows, n] = nxt
    active = state.active
    counts = torch.where(active, n + 1, 0)
    new_state = State(
        lens=(lens + counts).to(torch.int32),
        pending=torch.where(active, nxt, state.pending),
        target_queries={layer: torch.where(active[:, None, None, None], q[rows, :, n][:, :, None],
                                           state.target_queries[layer]) for layer, q in queries.items()},
        active=active, target_scores=attention.target_scores if policy.estimate_every > 1 else None)
    read = sum(((history + T) * active).sum() for history in attention.read)
    dense = ((lens.long() + T) * active).sum() * len(attention.read)
    return Step(tokens, counts, new_state, read, dense)


STEP_GRAPHS = 64  # graphs of the step one process may build: one or two per policy, gamma and batch


@functools.cache
def compiled_step(backend: str = "inductor", device_type: str = "cpu"):
    """`speculative_step` compiled into one graph per (policy, gamma, models) (`fullgraph=True`: the ops are
    opaque custom ops, lengths stay on the device); `generate` marks the caches' length dynamic, so any
    context reuses it. On CUDA with Inductor its replays are CUDA graphs (`mode="reduce-overhead"`), recorded
    once per batch and cache size."""
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None
    compiled = torch.compile(speculative_step, fullgraph=True, backend=backend, mode=mode)

    @functools.wraps(speculative_step)
    def step(*args):
        with torch._dynamo.config.patch(recompile_limit=STEP_GRAPHS):  # fullgraph: past the limit is an error
            return compiled(*args)

    return step


@dataclasses.dataclass
class Stats:
    """Acceptance length = tokens a sequence gets from one verification (accepted drafts + 1);
    accept_hist[k - 1] counts (sequence, step) pairs that got k. KV bytes: what the target's attention
    read over all layers at the verification steps (K and V of the history it attends plus the
    window), what dense verification would read, and the K bytes read by the policy's scores."""
    policy: str
    gamma: int
    steps: int = 0
    new_tokens: int = 0
    accept_hist: list[int] = dataclasses.field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    step_s: list[float] = dataclasses.field(default_factory=list)  # wall time of each decode step
    step_tokens: list[int] = dataclasses.field(default_factory=list)  # new tokens of each decode step
    kv_read_bytes: int = 0
    kv_dense_bytes: int = 0
    score_bytes: int = 0
    fidelity: dict | None = None  # `fidelity.Probe.summary()` of a run with fidelity=True

    @property
    def mean_accept(self) -> float:
        total = sum(self.accept_hist)
        return sum((k + 1) * c for k, c in enumerate(self.accept_hist)) / total if total else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    def steady(self) -> tuple[float, float]:
        """(ms per step, tokens/s) of the steps after the first, whose time may include recording a CUDA
        graph for the run's new caches (all steps when there is one)."""
        seconds, tokens = self.step_s[1:] or self.step_s, self.step_tokens[1:] or self.step_tokens
        return (1e3 * sum(seconds) / len(seconds), sum(tokens) / sum(seconds)) if seconds else (0.0, 0.0)

    @property
    def kv_fraction(self) -> float:
        """(verification + score bytes) / dense verification bytes."""
        return (self.kv_read_bytes + self.score_bytes) / self.kv_dense_bytes if self.kv_dense_bytes else 1.0

    def to_json(self) -> dict:
        ms_per_step, tokens_per_s = self.steady()
        return {**dataclasses.asdict(self), "mean_accept": self.mean_accept, "tokens_per_s": self.tokens_per_s,
                "steady_ms_per_step": ms_per_step, "steady_tokens_per_s": tokens_per_s,
                "kv_fraction": self.kv_fraction}


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per sequence (an EOS that ended one is included)
    stats: Stats


@torch.no_grad()
def generate(draft: Transformer | None, target: Transformer, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int | Sequence[int] = 64, gamma: int = 4, policy=Dense(), sampler: Sampler = Sampler(),
             eos_ids: Sequence[int] | None = None, max_len: int | None = None, chunk: int | None = None,
             progress: bool = False, fidelity: bool = False, compile: bool | str = False) -> Generation:
    """Speculative decoding of a batch of token-id prompts (ragged lengths).

    max_new_tokens: one int or one per prompt; a sequence also stops after any of `eos_ids` (default:
    the target config's eos_token_id). max_len: cache positions (default: just enough, the longest
    prompt + max_new_tokens + gamma). draft=None with gamma=0 is plain decoding by the target.
    fidelity: also measure each sparse step against dense verification (`fidelity.py`; slower, same tokens).
    compile: run each step as one `torch.compile(fullgraph=True)` graph (`compiled_step`; True: Inductor,
    CUDA graphs on CUDA; a string names another torch.compile backend), not with fidelity; when sampling,
    each step's uniforms are drawn before it (`Sampler.noise`), so it gives the eager step's tokens.
    Returns the new tokens of each sequence and the `Stats`."""
    B = len(prompts)
    max_new = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(max_new) != B or any(not isinstance(n, int) or n < 0 for n in max_new):
        raise ValueError(f"max_new_tokens: expected an int >= 0 or one per prompt, got {max_new_tokens!r}")
    if not isinstance(gamma, int) or not (gamma >= 1 if draft is not None else gamma == 0):
        raise ValueError(f"gamma: expected an int >= 1 with a draft model (0 without), got {gamma!r}")
    if draft is None and policy.draft_heads:
        raise ValueError(f"policy: {policy.name!r} reads the draft's queries and needs a draft model")
    if draft is not None and draft.device != target.device:
        raise ValueError(f"draft: expected a model on {target.device} like the target, got {draft.device}")
    eos = set(target.config.eos_token_ids if eos_ids is None else eos_ids)
    need = max((len(p) for p in prompts), default=0) + max(max_new, default=0) + gamma
    if max_len is not None and need > max_len:
        raise ValueError(f"max_len: the longest prompt + max_new_tokens + gamma = {need} positions do not fit "
                         f"the cache of {max_len}")
    name = policy.name if draft is not None else "plain" if policy.name == "dense" else f"plain/{policy.name}"
    stats = Stats(name, gamma, accept_hist=[0] * (gamma + 1))
    if compile and fidelity:
        raise ValueError("compile: the compiled step is unprobed (fidelity reads the host); pass one of them")
    step_fn = compiled_step("inductor" if compile is True else compile, target.device.type) if compile \
        else speculative_step
    probe = Probe() if fidelity else None
    begin = time.perf_counter()
    draft_cache, target_cache, state = start(draft, target, prompts, max_len or need, policy, chunk=chunk)
    if compile:
        for t in target_cache.k + target_cache.v + (draft_cache.k + draft_cache.v if draft_cache else []):
            torch._dynamo.maybe_mark_dynamic(t, 2)  # one graph for every cache length
            if target.device.type == "cuda":  # CUDA graphs keep the caches where they were captured
                torch._dynamo.mark_static_address(t)
    done = [n == 0 for n in max_new]
    state.active = torch.tensor([not d for d in done], device=target.device)
    per_token = target_cache.kv_bytes_per_token() // target.config.num_layers  # per layer
    out: list[list[int]] = [[] for _ in prompts]
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)  # the prefill's kernels in its time, not in the first step's
    stats.prefill_s = time.perf_counter() - begin
    begin = tick = time.perf_counter()
    from tqdm import tqdm

    read = dense = scores = torch.zeros((), dtype=torch.long, device=target.device)  # on the device: no syncs
    with tqdm(total=sum(max_new), disable=not progress, unit="tok", leave=False) as bar:
        while not all(done):
            state.estimate = policy.estimates(stats.steps)
            scores = scores + policy.score_bytes(draft, target, state.lens, gamma + 1, state.active, state.estimate)
            if compile and target.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()  # this step's replay may reuse the last one's memory
            noise = None if sampler.greedy else sampler.noise(B, gamma, target.device)
            step = step_fn(draft, target, draft_cache, target_cache, state, policy, sampler, gamma, probe, noise)
            emitted = torch.cat([step.tokens, step.counts[:, None]], 1).tolist()  # the step's one host sync
            before, ended = sum(map(len, out)), False
            for b, (*tokens, count) in enumerate(emitted):
                if done[b]:
                    continue
                stats.accept_hist[count - 1] += 1
                for t in tokens[:count]:
                    out[b].append(t)
                    if t in eos or len(out[b]) == max_new[b]:
                        done[b] = ended = True
                        break
            state = step.state.cloned() if compile else step.state
            if ended:  # parked at length 0, cheap (the step's one host-to-device copy, only when one ends)
                state.active = torch.tensor([not d for d in done], device=target.device)
                state.lens = torch.where(state.active, state.lens, 0)
            stats.steps += 1
            read, dense = read + step.read_tokens, dense + step.dense_tokens
            stats.step_tokens.append(sum(map(len, out)) - before)
            stats.step_s.append(time.perf_counter() - tick)
            tick += stats.step_s[-1]
            bar.update(stats.step_tokens[-1])
    stats.decode_s = time.perf_counter() - begin
    stats.kv_read_bytes, stats.kv_dense_bytes = int(read) * per_token, int(dense) * per_token
    stats.score_bytes = int(scores)
    stats.new_tokens = sum(map(len, out))
    stats.fidelity = probe.summary() if probe is not None else None
    return Generation(out, stats)
