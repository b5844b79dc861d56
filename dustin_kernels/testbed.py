"""A retrieval testbed: hand-built Llama / Qwen2 model pairs whose attention provably retrieves.

Random-weight models attend diffusely, so they cannot tell a good selection of history tokens from
a bad one. These models copy: prompted with filler words, a few planted needles (a key word followed
by value words) and a key again at the end, the target greedily generates that key's values, and it
can only do so by attending to the needle. No download, deterministic, built in seconds.

Construction (every weight set by hand, RoPE as in the real models):
- residual stream: a one-hot token code (TOK, `vocab` dims), the previous token's retrieval code
  (PREV, written by layer 0) and a constant 1 (ONE); the rest of `hidden` stays zero. Embeddings are
  tied: the logits read TOK back.
- layer 0, q head 0: a previous-token head. Its q and k are constants in the fast rotary pairs whose
  RoPE-rotated product peaks at distance 1: the weights of those frequencies are solved once per
  shape for the largest attention on the previous token (`previous_token_weights`). Its value is the
  token's retrieval code, which it writes to PREV.
- retrieval layers, q head 0 of each KV group: an induction head. Its query is the current token's
  retrieval code, its key the PREV code, both in the slow rotary pairs that a large `rope_theta` makes
  nearly position-free, so it attends to the position after an earlier occurrence of the current
  token. In the last layer (the writer) its value is the token's identity code, read back through
  the tied embeddings: the model predicts the token that followed the current one before. Earlier
  retrieval layers attend the same way and write nothing.
- every other head is a decoy that real models have: sink heads (attend to the first token, `<s>`),
  local-decay heads (attend to the last few dozen tokens); they write nothing. MLPs are zero.
- the draft has the target's first layer and its writer layer only, and its induction query is
  noisier (`draft_noise`) and pulled towards the sink, so it agrees with the target only in part:
  acceptance is below gamma + 1 and its lookahead sometimes misses a needle.

`build(spec)` makes the (draft, target) state dicts, `models(spec)` the two `Transformer`s, `write(spec,
folder)` writes both as Hugging Face folders (config.json, model.safetensors, tokenizer.json) that
`transformers` and our loader run, `prompt(spec, ...)` makes a needle prompt and its expected values,
`recall` scores an output, `profile(spec)` names the retrieval heads that calibration should find.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

from .shapes import PRESETS, AttentionShape

SPECIALS = ("<unk>", "<s>", "</s>")
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # filler words are two of them
BOS, EOS = 1, 2
PREVIOUS_SHARPNESS = 60.0  # logit of the previous-token head at distance 1
SINK_LOGIT, LOCAL_LOGIT = 12.0, 16.0  # logits of the sink heads on <s>, of the local heads at distance 0
COPY_GAIN = 6.0  # logit of the copied token over the current one, through the tied embeddings
DRAFT_SINK_PULL = 8.0  # the draft's induction heads also pay this logit to <s>


@dataclasses.dataclass(frozen=True)
class TestbedSpec:
    """A model pair: the target's attention `shape` (q heads, KV heads, head dim, layers) and family;
    the draft is 2 layers of the same shape, or with `draft_kv_heads` KV heads (a divisor of the q heads:
    a draft whose KV cache is narrower than the target's, as real drafts are). `sharpness`: the target's
    induction logit on its match; `draft_noise`: the share of the draft's induction query that is noise."""
    __test__ = False  # not a pytest class

    shape: AttentionShape = AttentionShape(4, 2, 64, 4)
    family: str = "qwen2"
    filler: int = 64
    keys: int = 8
    values: int = 64
    max_positions: int = 8192
    intermediate_size: int = 8
    rope_theta: float = 1e10
    sharpness: float = 24.0
    draft_noise: float = 0.8
    draft_kv_heads: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.family not in ("qwen2", "llama"):
            raise ValueError(f"family: expected 'qwen2' or 'llama', got {self.family!r}")
        if not 1 <= self.filler <= len(SYLLABLES) or self.keys < 1 or self.values < 1:
            raise ValueError(f"filler, keys, values: expected 1 to {len(SYLLABLES)} filler words and at least one key "
                             f"and one value, got {self.filler}, {self.keys}, {self.values}")
        if self.shape.layers < 2 or self.shape.head_dim % 16:
            raise ValueError(f"shape: expected >= 2 layers and a head dim divisible by 16, got {self.shape}")
        if self.draft_kv_heads is not None and not (
                isinstance(self.draft_kv_heads, int) and self.draft_kv_heads >= 1
                and self.shape.q_heads % self.draft_kv_heads == 0 and self.draft_kv_heads <= self.shape.kv_heads):
            raise ValueError(f"draft_kv_heads: expected None or a divisor of the {self.shape.q_heads} q heads, at most "
                             f"the target's {self.shape.kv_heads} KV heads, got {self.draft_kv_heads!r}")
        if self.tok_dims + 2 * len(self.pairs["slow"]) + 1 > self.hidden:
            raise ValueError(f"shape: hidden {self.hidden} cannot hold {self.tok_dims} token dims and the codes; "
                             "use fewer filler / key / value words or a wider shape")

    @property
    def draft_shape(self) -> AttentionShape:
        """The draft's attention shape: 2 layers, the target's heads or `draft_kv_heads` KV heads."""
        return dataclasses.replace(self.shape, layers=2, kv_heads=self.draft_kv_heads or self.shape.kv_heads)

    @property
    def hidden(self) -> int:
        return self.shape.q_heads * self.shape.head_dim

    @property
    def words(self) -> list[str]:
        filler = [SYLLABLES[i] + SYLLABLES[(7 * i + 3) % len(SYLLABLES)] for i in range(self.filler)]
        return [*SPECIALS, *filler, *(f"key{i}" for i in range(self.keys)), *(f"{100 + i}" for i in range(self.values))]

    @property
    def tok_dims(self) -> int:
        return len(self.words)

    @property
    def pairs(self) -> dict[str, list[int]]:
        """Rotary pairs by role: 'fast' (previous-token), 'local' (decay), 'sink' (the slowest), 'slow'
        (retrieval codes: at most 0.25 rad of rotation over max_positions)."""
        half = self.shape.head_dim // 2
        theta = self.inv_freq()
        fast = list(range(half // 4))
        slow = [i for i in range(half - 1) if theta[i] * self.max_positions <= 0.25]
        return {"fast": fast, "local": [half // 4], "sink": [half - 1], "slow": slow}

    def inv_freq(self) -> torch.Tensor:
        d = self.shape.head_dim
        return 1.0 / self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)

    @property
    def retrieval_layers(self) -> tuple[int, ...]:
        """The target's layers with induction heads: the middle one (from 4 layers) and the last (the writer)."""
        last = self.shape.layers - 1
        return (last // 2 + 1, last) if self.shape.layers >= 4 else (last,)

    def layer_roles(self, layers: int) -> list[str]:
        """Per layer of a model with `layers` layers (the target's count, or 2 for the draft): 'previous'
        (layer 0), 'write' (the last), 'retrieve' (the target's other retrieval layers) or 'pass'."""
        return ["previous"] + ["write" if i == layers - 1 else "retrieve" if i in self.retrieval_layers else "pass"
                               for i in range(1, layers)]

    def head_roles(self, layer_role: str, group: int | None = None) -> list[str]:
        """Per q head of a layer whose KV groups hold `group` q heads (default: the target's): the first head
        of each KV group has the layer's role (in layer 0, only head 0 is the previous-token head); the
        others alternate 'sink' and 'local' decoys."""
        G = group or self.shape.group
        return ["previous" if layer_role == "previous" and h == 0
                else layer_role if h % G == 0 and layer_role in ("retrieve", "write")
                else ("sink", "local")[(h + h // G) % 2] for h in range(self.shape.q_heads)]

    def retrieval_heads(self, shape: AttentionShape | None = None) -> tuple[int, ...]:
        """The q heads that retrieve in a retrieval layer of `shape` (default: the target's): the first of each
        KV group."""
        shape = shape or self.shape
        return tuple(range(0, shape.q_heads, shape.group))

    def configs(self) -> tuple[dict, dict]:
        """The Hugging Face config.json of the draft and of the target."""
        return self.config(self.draft_shape), self.config(self.shape)

    def config(self, s: AttentionShape) -> dict:
        """The Hugging Face config.json of a model of this spec with attention shape `s`."""
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.family]
        return {"architectures": [arch], "model_type": self.family, "vocab_size": self.tok_dims,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": s.layers, "num_attention_heads": s.q_heads, "num_key_value_heads": s.kv_heads,
                "head_dim": s.head_dim, "hidden_act": "silu", "max_position_embeddings": self.max_positions,
                "rms_norm_eps": 1e-6, "rope_theta": self.rope_theta, "tie_word_embeddings": True,
                "bos_token_id": BOS, "eos_token_id": EOS, "torch_dtype": "float32"}


def sized(preset: str | None = None, layers: int | None = None, positions: int = 0, seed: int = 0) -> TestbedSpec:
    """The default spec at a preset attention shape (`shapes.PRESETS`; None: the default shape) with
    `layers` target layers (None: the default), cache positions for at least `positions` tokens (a power
    of two, at least the default's), and `seed`."""
    default = TestbedSpec()
    shape = dataclasses.replace(PRESETS[preset] if preset else default.shape, layers=layers or default.shape.layers)
    positions = max(default.max_positions, 1 << positions.bit_length())
    return dataclasses.replace(default, shape=shape, max_positions=positions, seed=seed)


def previous_token_weights(spec: TestbedSpec) -> torch.Tensor:
    """float32[len(fast pairs)]: weights c (sum 1) of the fast rotary pairs for the previous-token head,
    whose logit at distance d is PREVIOUS_SHARPNESS * sum_i c_i cos((d - 1) theta_i): chosen to maximise
    its attention on distance 1 against every distance in [0, max_positions). A small convex problem,
    solved by exponentiated gradient steps; rounded, so the built bytes are stable."""
    theta = spec.inv_freq()[spec.pairs["fast"]]
    d = torch.arange(spec.max_positions, dtype=torch.float64)
    gap = 1 - torch.cos((d[:, None] - 1) * theta)  # [N, F]: logit lost at distance d per unit weight
    c = torch.full((len(theta),), 1 / len(theta), dtype=torch.float64)
    for _ in range(500):  # exponentiated gradient descent of -log(attention on distance 1), on the simplex
        attention = torch.softmax(-PREVIOUS_SHARPNESS * (gap @ c), 0)
        c = c * torch.exp(0.02 * PREVIOUS_SHARPNESS * (gap.T @ attention))
        c /= c.sum()
    c = c.mul(1e4).round().clamp(min=1)
    return (c / c.sum()).float()


def _codes(rows: int, dims: int, g: torch.Generator) -> torch.Tensor:
    """float32[rows, dims]: random unit vectors."""
    x = torch.randn(rows, dims, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _rotary(pairs: list[int], half: int) -> list[int]:
    """Head dims of rotary pairs `pairs`: the first components, then the second (rotate-half layout)."""
    return pairs + [p + half for p in pairs]


def build(spec: TestbedSpec) -> tuple[dict, dict]:
    """(draft, target) state dicts in Hugging Face names, float32 (built in float32: a 7B-shaped layer
    is 100 MB)."""
    g = torch.Generator().manual_seed(spec.seed)
    s, H, V = spec.shape, spec.hidden, spec.tok_dims
    D, half = s.head_dim, s.head_dim // 2
    pairs = spec.pairs
    P = 2 * len(pairs["slow"])
    prev_dims, one = list(range(V, V + P)), V + P
    code = _codes(V, P, g)  # retrieval code of each token
    noisy = _codes(V, P, g)
    draft_code = math.sqrt(1 - spec.draft_noise ** 2) * code + spec.draft_noise * noisy
    draft_code /= draft_code.norm(dim=1, keepdim=True)
    identity = (torch.randint(0, 2, (s.kv_heads * D, V), generator=g).float() * 2 - 1) \
        / math.sqrt(s.kv_heads * D)  # identity code of each token over the writer heads' values
    theta = spec.inv_freq()
    prev_c = previous_token_weights(spec)
    root = D ** 0.25  # q.k / sqrt(D) = logit when q and k each carry logit ** 0.5 * root

    embed = torch.zeros(V, H)
    embed[torch.arange(V), torch.arange(V)] = 1.0
    embed[:, one] = 1.0

    def layer(role_of_layer: str, kv_heads: int, retrieval_code, retrieval_logit: float, sink_pull: float) -> dict:
        """One decoder layer with `kv_heads` KV heads; role_of_layer: 'previous' (layer 0), 'retrieve', 'write'
        or 'pass'. The identity codes of fewer KV heads than the target's are rescaled to the same copy logit."""
        r = math.sqrt((2 if role_of_layer == "previous" else 3) / H)  # RMS of the residual this layer reads
        G = s.q_heads // kv_heads
        ident = identity[:kv_heads * D] * math.sqrt(s.kv_heads / kv_heads)
        q = torch.zeros(s.q_heads, D, H)
        k = torch.zeros(kv_heads, D, H)
        v = torch.zeros(kv_heads, D, H)
        o = torch.zeros(H, s.q_heads, D)
        slow = _rotary(pairs["slow"], half)
        local, sink = pairs["local"][0], pairs["sink"][0]
        amp = (prev_c * PREVIOUS_SHARPNESS).sqrt() * root
        angle = theta[pairs["fast"]]
        for j in range(kv_heads):  # every KV head carries every pattern's key
            k[j, pairs["fast"], one] = amp * r
            k[j, local, one] = math.sqrt(LOCAL_LOGIT) * root * r
            k[j, sink, BOS] = math.sqrt(SINK_LOGIT) * root * r
            k[j][torch.tensor(slow)[:, None], torch.tensor(prev_dims)] = torch.eye(P) * root * r
            v[j, :, :V] = ident[j * D:(j + 1) * D] * r
        for h, role in enumerate(spec.head_roles(role_of_layer, G)):
            if role == "previous":
                q[h, pairs["fast"], one] = amp * torch.cos(angle) * r
                q[h, [p + half for p in pairs["fast"]], one] = -amp * torch.sin(angle) * r
                v[h // G, :, :] = 0
                v[h // G, :P, :V] = code.T * r
                o[prev_dims, h, :P] = torch.eye(P)
            elif role in ("retrieve", "write"):
                q[h][torch.tensor(slow)[:, None], torch.arange(V)] = retrieval_code.T * retrieval_logit * root * r
                q[h, sink, one] = sink_pull * root / math.sqrt(SINK_LOGIT) * r
                if role == "write":
                    o[:V, h, :] = COPY_GAIN * ident[(h // G) * D:(h // G + 1) * D].T
            elif role == "sink":
                q[h, sink, one] = math.sqrt(SINK_LOGIT) * root * r
            else:
                q[h, local, one] = math.sqrt(LOCAL_LOGIT) * root * r
        return {"self_attn.q_proj.weight": q.reshape(-1, H), "self_attn.k_proj.weight": k.reshape(-1, H),
                "self_attn.v_proj.weight": v.reshape(-1, H), "self_attn.o_proj.weight": o.reshape(H, -1)}

    def model(shape: AttentionShape, retrieval_code, retrieval_logit, sink_pull) -> dict:
        state = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(H)}
        for i, role in enumerate(spec.layer_roles(shape.layers)):
            weights = layer(role, shape.kv_heads, retrieval_code, retrieval_logit, sink_pull)
            weights |= {"input_layernorm.weight": torch.ones(H),
                        "post_attention_layernorm.weight": torch.ones(H),
                        "mlp.gate_proj.weight": torch.zeros(spec.intermediate_size, H),
                        "mlp.up_proj.weight": torch.zeros(spec.intermediate_size, H),
                        "mlp.down_proj.weight": torch.zeros(H, spec.intermediate_size)}
            if spec.family == "qwen2":
                weights |= {f"self_attn.{n}_proj.bias": torch.zeros(w.shape[0])
                            for n, w in (("q", weights["self_attn.q_proj.weight"]),
                                         ("k", weights["self_attn.k_proj.weight"]),
                                         ("v", weights["self_attn.v_proj.weight"]))}
            state |= {f"model.layers.{i}.{name}": w for name, w in weights.items()}
        return {name: w.contiguous() for name, w in state.items()}

    target = model(s, code, spec.sharpness, 0.0)
    draft = model(spec.draft_shape, draft_code, spec.sharpness, DRAFT_SINK_PULL)
    return draft, target


def prompt(spec: TestbedSpec, length: int, *, needles: int = 4, values: int = 8, ask: int | None = None,
           seed: int = 0) -> tuple[list[int], list[int]]:
    """(token ids of a prompt of `length` tokens, the ids of the values it asks for): `<s>`, random filler
    words with `needles` needles (a key word, then `values` value words, all distinct) planted at random
    depths of the first 90%, and the key of needle `ask` (default: a random one) as the last word."""
    width = 1 + values
    if needles * values > spec.values or needles > spec.keys:
        raise ValueError(f"needles: {needles} needles of {values} values need {needles} keys and {needles * values} "
                         f"value words; the testbed has {spec.keys} and {spec.values}")
    if length < needles * (width + 1) * 2 + 2:
        raise ValueError(f"length: {length} tokens cannot hold {needles} needles of {width} words")
    g = torch.Generator().manual_seed(seed)
    first_key, first_value = len(SPECIALS) + spec.filler, len(SPECIALS) + spec.filler + spec.keys
    ids = (len(SPECIALS) + torch.randint(spec.filler, (length,), generator=g)).tolist()
    ids[0] = BOS
    keys = (first_key + torch.randperm(spec.keys, generator=g)[:needles]).tolist()
    vals = (first_value + torch.randperm(spec.values, generator=g)[:needles * values]).view(needles, values).tolist()
    slots = (int(0.9 * (length - 1)) - 1) // (width + 1)  # non-overlapping needle slots after <s>
    for n, slot in enumerate(sorted(torch.randperm(slots, generator=g)[:needles].tolist())):
        at = 1 + slot * (width + 1)
        ids[at:at + width] = [keys[n], *vals[n]]
    ask = int(torch.randint(needles, (), generator=g)) if ask is None else ask
    ids[-1] = keys[ask]
    return ids, vals[ask]


def recall(output: list[int], expected: list[int]) -> float:
    """Share of the expected values generated at their place."""
    return sum(a == b for a, b in zip(output, expected)) / len(expected)


def tokenizer(spec: TestbedSpec):
    """The word-level `tokenizers.Tokenizer` of the testbed's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(spec.words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    return tok


def write(spec: TestbedSpec, folder) -> dict[str, Path]:
    """Write the pair as Hugging Face folders `folder/target` and `folder/draft` (config.json,
    model.safetensors, tokenizer.json, tokenizer_config.json); returns {"draft": path, "target": path}."""
    from safetensors.torch import save_file

    folder = Path(folder)
    paths = {}
    for who, state, config in zip(("draft", "target"), build(spec), spec.configs()):
        path = folder / who
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=1))
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        tokenizer(spec).save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(  # transformers: this tokenizer.json, as it is
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[BOS], "eos_token": SPECIALS[EOS],
             "unk_token": SPECIALS[0], "model_max_length": spec.max_positions}, indent=1))
        paths[who] = path
    return paths


def digest(spec: TestbedSpec) -> str:
    """sha256 of the built weights (names, shapes and bytes of both models, in order)."""
    h = hashlib.sha256()
    for state in build(spec):
        for name in sorted(state):
            h.update(name.encode())
            h.update(str(tuple(state[name].shape)).encode())
            h.update(state[name].numpy().tobytes())
    return h.hexdigest()


def models(spec: TestbedSpec, *, device="cpu", dtype=torch.float32):
    """(draft, target) as `Transformer`s in eval mode, without writing files."""
    from .models import ModelConfig, Transformer

    pair = []
    for state, config in zip(build(spec), spec.configs()):
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_hf(config))
        model.load_state_dict({k.removeprefix("model."): v.to(device, dtype) for k, v in state.items()}, strict=False,
                              assign=True)
        model.tie_weights()
        pair.append(model.eval())
    return tuple(pair)


def profile(spec: TestbedSpec, m: int | None = None):
    """The `RetrievalProfile` of the built heads: the draft's writer layer, the target's first retrieval
    layer (its writer when it has only one), the induction head of each KV group of each model."""
    from .policies import RetrievalProfile

    return RetrievalProfile({1: spec.retrieval_heads(spec.draft_shape)}, spec.retrieval_layers[0],
                            spec.retrieval_heads(), m, source="testbed")
