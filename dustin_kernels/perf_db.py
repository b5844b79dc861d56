"""The perf database: tuned launch configs per GPU model, as JSON files with a schema and provenance.

Layout: `perf_db/<kernel>/<arch>/<device>.json` (shipped in the package as `dustin_kernels.perf_db_data`;
`$DUSTIN_PERF_DB` points dispatch at another folder). `device` is the slug of the GPU name
(`NVIDIA H100 80GB HBM3` -> `nvidia_h100_80gb_hbm3`; `cpu` for interpreter runs). A file:

    {"_meta": {provenance of the run that last wrote it: GPU, clocks, versions, commit, sampler...},
     "arch": "sm90", "device": "nvidia_h200", "entries": {"<uri>|b<batch>|c<context>[|h<kv heads>]": {...}},
     "kernel": "sparse_verify", "schema_version": 1}

An entry holds the winning config, its median and IQR (us), GB/s and fraction of the measured copy
bandwidth, the runner-up, the default rule's config and time, the template hash, date, trials and
the workload it was timed on. Keys (`spec.Launch.key()`): the spec uri, the batch bucket (next power of
two), the context bucket (nearest power of two in log space) and, for ops whose config depends on them,
the KV heads, of the `Launch` that the op's launcher passes to `dispatch.config_for`. Writes are
validated, canonical (sorted keys) and atomic (`os.replace`). The JSON Schema is `perf_db/schema.json`.
"""
from __future__ import annotations

import datetime
import functools
import importlib.resources
import json
import math
import os
import re
import stat
from pathlib import Path

from .spec import KERNELS, next_pow2

SCHEMA_VERSION = 1
_KEY = re.compile(r"^([a-z0-9_]+)\|b([1-9][0-9]*)\|c([1-9][0-9]*)(?:\|h([1-9][0-9]*))?$")


class PerfDBError(ValueError):
    """A DB file that cannot be read, parsed or validated."""


@functools.cache
def root() -> Path:
    """The package's perf_db folder (the repository's `perf_db/` in a source checkout)."""
    try:
        return Path(str(importlib.resources.files("dustin_kernels.perf_db_data")))
    except ModuleNotFoundError:  # an editable install made before the package mapping existed
        return Path(__file__).resolve().parents[1] / "perf_db"


@functools.cache
def schema() -> dict:
    return json.loads((root() / "schema.json").read_text())


def batch_bucket(batch: int) -> int:
    """Batch bucket: the next power of two (1, 2, 4, ...)."""
    return next_pow2(max(1, int(batch)))


def context_bucket(context: int) -> int:
    """Context bucket: the nearest power of two in log space (12000 -> 16384, 11000 -> 8192)."""
    return 1 << max(0, round(math.log2(max(1, int(context)))))


def entry_key(uri: str, batch: int, context: int, kv_heads: int = 0) -> str:
    """DB key of a spec at a (batch, context, kv_heads); batch and context are bucketed here, kv_heads 0 is
    left out (an op whose config does not depend on it)."""
    return f"{uri}|b{batch_bucket(batch)}|c{context_bucket(context)}" + (f"|h{kv_heads}" if kv_heads else "")


def parse_key(key: str) -> tuple[str, int, int, int]:
    """(uri, batch bucket, context bucket, kv heads or 0) of a DB key."""
    found = _KEY.match(key)
    if not found:
        raise PerfDBError(f"entry key: expected '<uri>|b<batch>|c<context>[|h<kv heads>]', got {key!r}")
    return found.group(1), int(found.group(2)), int(found.group(3)), int(found.group(4) or 0)


def device_slug(name: str) -> str:
    """File name of a GPU model: lower case, runs of other characters as '_' ('NVIDIA H200' -> 'nvidia_h200')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def device_family(slug: str) -> str:
    """Model family of a device slug: its first token with a digit, after the vendor and brand words
    (nvidia_h200_nvl -> h200, nvidia_h100_80gb_hbm3 and nvidia_h100_pcie -> h100, nvidia_a100_sxm4_40gb ->
    a100, nvidia_geforce_rtx_4090 -> 4090)."""
    tokens = [t for t in slug.split("_") if t not in ("nvidia", "tesla", "geforce", "rtx", "quadro")]
    return next((t for t in tokens if any(c.isdigit() for c in t)), slug)


def path_for(db: Path, kernel: str, arch: str, device: str) -> Path:
    return Path(db) / kernel / arch / f"{device}.json"


def files(db: Path) -> list[Path]:
    """Every DB file under `db`, sorted."""
    db = Path(db)
    return sorted(p for k in KERNELS for p in (db / k).glob("*/*.json"))


def validate(doc) -> list[str]:
    """Schema errors of a parsed file, as '<json path>: <message>' strings (empty when valid).

    Uses jsonschema; where it is not installed, only the structure dispatch relies on is checked."""
    try:
        import jsonschema
    except ImportError:
        return _structure_errors(doc)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def _structure_errors(doc) -> list[str]:
    if not isinstance(doc, dict):
        return [f"<root>: expected an object, got {type(doc).__name__}"]
    errors = [f"<root>: missing {k!r}" for k in ("schema_version", "kernel", "arch", "device", "_meta", "entries")
              if k not in doc]
    if doc.get("schema_version") != SCHEMA_VERSION:
        errors.append(f"schema_version: expected {SCHEMA_VERSION}, got {doc.get('schema_version')!r}")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        return errors + ["entries: expected an object"]
    for key, entry in entries.items():
        if not _KEY.match(str(key)):
            errors.append(f"entries/{key}: bad key")
        elif not isinstance(entry, dict) or not isinstance(entry.get("config"), dict) or not all(
                isinstance(v, (int, bool)) for v in entry["config"].values()):
            errors.append(f"entries/{key}: expected an object with a 'config' object of ints")
    return errors


def config_errors(key: str, config: dict) -> list[str]:
    """Problems of an entry's config against its kernel's search space (`autotune/<kernel>.json`): the
    space's parameters exactly, each at one of its values, every constraint holding for the entry's spec
    at its batch bucket and the largest context of its context bucket. Empty when the config is usable."""
    from .autotune import space
    from .spec import KernelSpec, Launch

    uri, batch, context, kv_heads = parse_key(key)
    try:
        spec = KernelSpec.from_uri(uri)
    except ValueError as exc:
        return [f"does not name a kernel spec ({exc})"]
    kernel_space = space.load_space(spec.kernel)
    keys = set(config)
    if keys != set(kernel_space.params):
        return [f"expected the parameters {sorted(kernel_space.params)}, got {sorted(keys)}"]
    errors = [f"{name}: expected one of {values}, got {config[name]!r}" for name, values in kernel_space.params.items()
              if type(config[name]) is not int or config[name] not in values]  # 64.0 and True are not ints here
    env = space.variables(Launch(spec, batch, int(context * 2 ** 0.5), kv_heads))  # the bucket's reach
    return errors or [f"violates {expr!r}" for expr in kernel_space.violated(config, env)]


def read(path: Path) -> dict:
    """Parse and validate a DB file; raises PerfDBError naming the file and the first problems. Only
    regular files are opened (a FIFO or a folder named like a DB file is an error, never a hang)."""
    path = Path(path)
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise OSError("not a regular file")
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, huge ints
        raise PerfDBError(f"{path}: unreadable perf DB file ({type(exc).__name__}: {str(exc)[:200]})") from None
    errors = validate(doc)
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise PerfDBError(f"{path}: not a valid perf DB file: {'; '.join(errors[:3])}{more}")
    return doc


def dumps(doc: dict) -> str:
    """Canonical text of a file: sorted keys, one-space indent, trailing newline."""
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def write(path: Path, doc: dict) -> None:
    """Validate and write atomically (temporary file in the same folder, then os.replace)."""
    errors = validate(doc)
    if errors:
        raise PerfDBError(f"{path}: refusing to write an invalid perf DB file: {'; '.join(errors[:3])}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def new_file(kernel: str, arch: str, device: str, meta: dict) -> dict:
    return {"schema_version": SCHEMA_VERSION, "kernel": kernel, "arch": arch, "device": device, "_meta": meta,
            "entries": {}}


def update(path: Path, kernel: str, arch: str, device: str, meta: dict, entries: dict) -> dict:
    """Merge `entries` into the file at `path` (created if missing), replace its `_meta`, write atomically
    under a file lock; returns the written document. An unreadable existing file is an error, not
    silently overwritten."""
    import hashlib
    import tempfile

    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with FileLock(str(Path(tempfile.gettempdir()) / f"dustin_perf_db_{name}.lock")):  # not in the DB folder
        doc = read(path) if path.exists() else new_file(kernel, arch, device, meta)
        if (doc["kernel"], doc["arch"], doc["device"]) != (kernel, arch, device):
            raise PerfDBError(f"{path}: holds {doc['kernel']}/{doc['arch']}/{doc['device']}, "
                              f"not {kernel}/{arch}/{device}")
        doc["_meta"] = meta
        doc["entries"].update(entries)
        write(path, doc)
    return doc


def stale_keys(doc: dict, template_hash: str) -> list[str]:
    """Keys of entries tuned for another version of the kernel's template (still used, but retune)."""
    return sorted(k for k, e in doc["entries"].items() if e.get("template_hash") != template_hash)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
