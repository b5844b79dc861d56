"""Render a spec's Jinja2 template into the cache folder and import it (spec -> uri -> render -> load).

Cache folder: `$DUSTIN_CACHE_DIR/generated`, default `~/.cache/dustin_kernels/generated`. A rendered file is
written only when its text changed, under a file lock with a re-check, so concurrent processes are safe.
Where that folder cannot be created or written (read-only, a file in the way), the process renders into
a private temporary folder instead and warns once.

    python -m dustin_kernels.codegen sparse_verify_sm90_bf16_d128_g8_t5_bs1   # print rendered source
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.resources
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

import jinja2
from filelock import FileLock

from .spec import KernelSpec


def cache_dir() -> Path:
    """The configured render cache folder (see the module docstring)."""
    root = os.environ.get("DUSTIN_CACHE_DIR") or Path.home() / ".cache" / "dustin_kernels"
    return Path(root) / "generated"


@functools.cache
def _render_dir(configured: str) -> Path:
    """`configured` if it can be created and written, else a private temporary folder (one warning)."""
    folder = Path(configured)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return folder
    except OSError as exc:
        private = Path(tempfile.mkdtemp(prefix="dustin_kernels_generated_"))
        warnings.warn(f"render cache {folder}: not usable ({type(exc).__name__}: {exc.strerror or exc}); rendering "
                      f"into {private} for this process (set DUSTIN_CACHE_DIR to a writable folder)",
                      RuntimeWarning, stacklevel=3)
        return private


@functools.cache
def _environment() -> jinja2.Environment:
    folder = importlib.resources.files("dustin_kernels.templates")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_source(kernel: str) -> str:
    """The unrendered template text of a kernel family."""
    env = _environment()
    return env.loader.get_source(env, f"{kernel}.py.j2")[0]


def template_hash(kernel: str) -> str:
    """Short hash of a template's text (perf-DB entries record it to detect stale configs)."""
    return hashlib.sha256(template_source(kernel).encode()).hexdigest()[:16]


def render(spec: KernelSpec) -> str:
    """The Python/Triton source of `spec`."""
    header = f"# Generated from templates/{spec.kernel}.py.j2 for {spec.uri()}; do not edit.\n"
    return header + _environment().get_template(f"{spec.kernel}.py.j2").render(**spec.template_vars())


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and path.read_text() == text:  # another process wrote it meanwhile
            return
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


@functools.cache
def load(spec: KernelSpec) -> ModuleType:
    """Render `spec` (if changed), import the module, cache it for the process."""
    path = _render_dir(str(cache_dir())) / f"{spec.uri()}.py"
    _write_if_changed(path, render(spec))
    name = f"dustin_kernels._generated.{spec.uri()}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # Triton's jit reads the function source through the module
    module_spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dustin_kernels.codegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri", nargs="+", help="spec uri(s), e.g. attention_scores_sm90_bf16_d64_g4_t5_bs16")
    for uri in parser.parse_args(argv).uri:
        sys.stdout.write(render(KernelSpec.from_uri(uri)))


if __name__ == "__main__":
    main()
