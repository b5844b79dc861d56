"""Which backend runs an op, which arch path its kernel is rendered for, and with which launch config.

Backend: `None` picks "triton" for CUDA tensors and "torch" for CPU tensors. "triton" on CPU tensors
runs the same kernels in Triton's interpreter and needs `TRITON_INTERPRET=1` set before triton is
imported.

Launch config (`config_for(launch, default)`, called by every Triton launcher with a `spec.Launch`):
the perf DB (`dustin_kernels.perf_db`, folder `$DUSTIN_PERF_DB` or the package's) is searched along the chain

    this GPU's file -> files of the same family (H200 / H200 NVL, H100 SXM / PCIe / NVL, ...)
    -> any file of the same arch -> the op's documented `default_config(launch)` rule,

for an entry of the spec's uri at the launch's batch bucket (next power of two) and KV heads; among
that file's context buckets the nearest in log space wins. A fallback or a miss warns once per
(spec, batch bucket, KV heads, device) and misses are counted (`misses()`). A corrupt or truncated
file (or anything but a regular file) warns and is ignored (the next level or the default rule is
used); an entry whose config breaks its kernel's search space (`perf_db.config_errors`) warns and
gives the default rule; entries tuned for an older template are used, with a warning. Files are read
once per process (`reset()` forgets them). `override()` pins a config (tests, the tuner); `record()`
collects the calls (the tuner learns each op's DB key); `using()` points the lookup at another folder
or device name (tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from . import perf_db
from .spec import Launch

BACKENDS = ("torch", "triton")


class PerfDBWarning(UserWarning):
    """A perf-DB miss, fallback, stale entry or unreadable file."""


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(backend: str | None, device: torch.device) -> str:
    """Resolve the `backend=` argument of a public op for tensors on `device`."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels on CPU in Triton's interpreter")
    return backend


def arch_for(device: torch.device) -> str:
    """Template arch path for `device`: 'sm90' (Hopper and newer), 'sm80' (Ampere, Ada) or 'interp'."""
    if device.type != "cuda":
        return "interp"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    raise ValueError(f"device: dustin_kernels needs compute capability >= 8.0, got {major}.{minor}")


@dataclasses.dataclass(frozen=True)
class Hit:
    """A resolved DB lookup: the entries of one file for one (uri, batch bucket, kv heads)."""
    level: str  # "device" | "family" | "arch"
    device: str  # the file's device slug
    contexts: tuple  # ((log2 context bucket, config), ...)

    def config(self, context: int) -> dict | None:
        """Config of the context bucket nearest to `context` in log space (ties: the larger bucket); None
        where that bucket's entry is invalid."""
        x = math.log2(max(1, context))
        return min(self.contexts, key=lambda c: (abs(c[0] - x), -c[0]))[1]


class _State:
    def __init__(self):
        self.db: str | None = None  # using(db=...); else $DUSTIN_PERF_DB, else the package's folder
        self.device: str | None = None  # using(device=...): the slug of a GPU name to pretend
        self.overrides: list = []  # [(kernel | KernelSpec | None, config)]
        self.recordings: list = []
        self.tables: dict = {}  # (db, kernel, arch) -> {slug: {uri: {(batch bucket, kv heads): [(ctx, config)]}}}
        self.hits: dict = {}  # (db, spec, device slug, batch bucket, kv heads) -> Hit | None
        self.cuda_names: dict = {}  # device index -> slug
        self.warned: set = set()
        self.misses: Counter = Counter()  # (spec, batch bucket, kv heads, device slug) -> calls (see misses())


_state = _State()
_UNRESOLVED = object()


def _root() -> str:
    return _state.db or os.environ.get("DUSTIN_PERF_DB") or str(perf_db.root())


def db_root() -> Path:
    """The DB folder dispatch reads: `using(db=...)`, else `$DUSTIN_PERF_DB`, else the package's."""
    return Path(_root())


def reset() -> None:
    """Forget parsed files, resolved lookups, warnings and miss counts (files are re-read on next use)."""
    _state.tables.clear()
    _state.hits.clear()
    _state.cuda_names.clear()
    _state.warned.clear()
    _state.misses.clear()


def misses() -> dict:
    """Calls that fell back to the default rule, by '<uri>|b<batch bucket>[|h<kv heads>]|<device>'."""
    return {f"{spec.uri()}|b{bucket}{f'|h{heads}' if heads else ''}|{slug}": n
            for (spec, bucket, heads, slug), n in _state.misses.items()}


@contextlib.contextmanager
def override(config: dict, *, kernel: str | None = None, spec=None):
    """Within the block, `config_for` returns `config` for `spec` (or every spec of `kernel`, or every
    spec when both are None). Nested overrides: the innermost matching one wins."""
    if (kernel is not None) + (spec is not None) > 1:
        raise ValueError("override: give at most one of kernel= and spec=")
    item = (spec if spec is not None else kernel, dict(config))
    _state.overrides.append(item)
    try:
        yield
    finally:
        _state.overrides.remove(item)


@contextlib.contextmanager
def record():
    """Yields a list that collects (launch, default) of every `config_for` call in the block."""
    calls: list = []
    _state.recordings.append(calls)
    try:
        yield calls
    finally:
        _state.recordings.remove(calls)


@contextlib.contextmanager
def using(db: str | os.PathLike | None = None, device: str | None = None):
    """Within the block, read the DB at `db` and/or pretend the CUDA GPU is named `device` (tests)."""
    saved = (_state.db, _state.device)
    _state.db = str(db) if db is not None else saved[0]
    _state.device = perf_db.device_slug(device) if device is not None else saved[1]
    reset()
    try:
        yield
    finally:
        _state.db, _state.device = saved
        reset()


def device_slug(arch: str, device: torch.device | None = None) -> str:
    """DB file name of the GPU running `arch` kernels ('cpu' for the interpreter)."""
    if arch == "interp":
        return "cpu"
    if _state.device is not None:
        return _state.device
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    slug = _state.cuda_names.get(index)
    if slug is None:
        slug = _state.cuda_names[index] = perf_db.device_slug(torch.cuda.get_device_name(index))
    return slug


def config_for(launch: Launch, default: Callable[[Launch], dict], device=None) -> dict:
    """Launch config of `launch` (see the module docstring for the chain).

    `default(launch)` is the op's documented rule; `device` (a torch.device) picks the GPU whose DB file
    is read (default: the current CUDA device)."""
    for calls in _state.recordings:
        calls.append((launch, default))
    spec = launch.spec
    for target, config in reversed(_state.overrides):
        if target is None or target == spec or target == spec.kernel:
            return dict(config)
    slug = device_slug(spec.arch, device)
    bucket = perf_db.batch_bucket(launch.batch)
    key = (_root(), spec, slug, bucket, launch.kv_heads)
    hit = _state.hits.get(key, _UNRESOLVED)
    if hit is _UNRESOLVED:
        hit = _state.hits[key] = _resolve(spec, slug, bucket, launch.kv_heads)
    config = hit.config(launch.context) if hit is not None else None
    if config is not None:
        return dict(config)
    _state.misses[spec, bucket, launch.kv_heads, slug] += 1  # no string formatting per call: misses() names them
    return default(launch)


def _resolve(spec, slug: str, bucket: int, kv_heads: int) -> Hit | None:
    """First file along the chain with entries for (uri, batch bucket, kv heads)."""
    table = _table(spec.kernel, spec.arch)
    family = perf_db.device_family(slug)
    others = sorted(d for d in table if d != slug)
    chain = ([("device", slug)] if slug in table else []) + [
        ("family", d) for d in others if perf_db.device_family(d) == family] + [
        ("arch", d) for d in others if perf_db.device_family(d) != family]
    uri = spec.uri()
    where = f"{uri} at batch bucket {bucket}{f' with {kv_heads} KV heads' if kv_heads else ''} on {slug}"
    for level, device in chain:
        rows = table[device].get(uri, {}).get((bucket, kv_heads))
        if not rows:
            continue
        if level != "device":
            _warn_once(("fallback", uri, bucket, kv_heads, slug),
                       f"perf DB: no entry for {where} in {db_root()}; using the one tuned on {device} "
                       f"(same {'family' if level == 'family' else 'arch'})")
        return Hit(level, device, tuple((math.log2(ctx), config) for ctx, config in sorted(rows)))
    if spec.arch != "interp":  # the interpreter's configs are not performance settings: no warning
        _warn_once(("miss", uri, bucket, kv_heads, slug),
                   f"perf DB: no tuned config for {where} ({spec.arch}) in {db_root()}; using the default rule "
                   f"of {spec.kernel} (run `python -m dustin_kernels.autotune` on this GPU)")
    return None


def _table(kernel: str, arch: str) -> dict:
    """{device slug: {uri: {(batch bucket, kv heads): [(context bucket, config)]}}} of the files of (kernel, arch)."""
    key = (_root(), kernel, arch)
    if key not in _state.tables:
        _state.tables[key] = _load(kernel, arch)
    return _state.tables[key]


def _load(kernel: str, arch: str) -> dict:
    from .codegen import template_hash

    table: dict = {}
    for path in sorted((db_root() / kernel / arch).glob("*.json")):
        try:
            doc = perf_db.read(path)
            if (doc["kernel"], doc["arch"], doc["device"]) != (kernel, arch, path.stem):
                raise perf_db.PerfDBError(f"{path}: holds {doc['kernel']}/{doc['arch']}/{doc['device']}")
            rows: dict = {}
            for entry_key, entry in doc["entries"].items():
                uri, batch, context, kv_heads = perf_db.parse_key(entry_key)
                rows.setdefault(uri, {}).setdefault((batch, kv_heads), []).append(
                    (context, _checked(path, entry_key, entry)))
        except perf_db.PerfDBError as exc:
            _warn_once(("file", str(path)), f"perf DB: {exc}; file ignored, default rules used instead")
            continue
        table[path.stem] = rows
        stale = perf_db.stale_keys(doc, template_hash(kernel))
        if stale:
            _warn_once(("stale", str(path)),
                       f"perf DB: {len(stale)} of {len(doc['entries'])} entries of {path} were tuned for another "
                       f"version of templates/{kernel}.py.j2 (stale, still used; retune)")
    return table


def _checked(path: Path, key: str, entry: dict) -> dict | None:
    """The entry's config, or None (with a warning) where it breaks its kernel's search space."""
    errors = perf_db.config_errors(key, entry["config"])
    if errors:
        _warn_once(("config", str(path), key), f"perf DB: {path}: entry {key} has an invalid config "
                   f"({'; '.join(errors)}); the default rule is used instead")
        return None
    return entry["config"]


def _warn_once(key, message: str) -> None:
    if key not in _state.warned:
        _state.warned.add(key)
        warnings.warn(message, PerfDBWarning, stacklevel=4)
