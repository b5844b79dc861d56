"""Specs, rendering and loading: names, the render cache, concurrency, installed-wheel lookup."""
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dustin_kernels import codegen
from dustin_kernels.spec import ARCHS, KERNELS, KernelSpec

ROOT = Path(__file__).resolve().parents[1]
SPECS = [
    KernelSpec("attention_scores", "sm90", "bf16", head_dim=64, group=4, window=5, block_size=16),
    KernelSpec("select_tokens", "sm80", "fp32", block_size=1),
    KernelSpec("sparse_verify", "interp", "fp16", head_dim=80, group=8, window=5, block_size=1, variant="paged"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.uri())
def test_uri_round_trip(spec):
    assert KernelSpec.from_uri(spec.uri()) == spec


def test_uri_reads_like_a_test_id():
    spec = KernelSpec("sparse_verify", "sm90", "bf16", head_dim=128, group=8, window=5, block_size=1)
    assert spec.uri() == "sparse_verify_sm90_bf16_d128_g8_t5_bs1"


@pytest.mark.parametrize("field, value", [("kernel", "softmax"), ("arch", "sm70"), ("dtype", "fp8"),
                                          ("block_size", 12)])
def test_bad_spec_names_the_field(field, value):
    kwargs = dict(kernel="sparse_verify", arch="sm90", dtype="bf16", block_size=1) | {field: value}
    with pytest.raises(ValueError, match=field):
        KernelSpec(**kwargs)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_template_renders_and_differs_per_flavour(kernel, arch):
    spec = KernelSpec(kernel, arch, "bf16", head_dim=80 if kernel != "select_tokens" else 0,
                      group=4 if kernel != "select_tokens" else 0, window=5 if kernel != "select_tokens" else 0)
    source = codegen.render(spec)
    compile(source, spec.uri(), "exec")  # valid Python
    assert spec.uri() in source.splitlines()[0]
    if kernel != "select_tokens":
        assert "128" in source  # head dim 80 padded to a power of two
    interp = codegen.render(KernelSpec(**{**spec.__dict__, "arch": "interp"}))
    assert (".to(tl.float32)" in interp)  # the interpreter flavour upcasts loads


def test_load_writes_only_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSTIN_CACHE_DIR", str(tmp_path))
    spec = SPECS[2]
    path = tmp_path / "generated" / f"{spec.uri()}.py"
    codegen._write_if_changed(path, codegen.render(spec))
    first = path.stat().st_mtime_ns
    codegen._write_if_changed(path, codegen.render(spec))
    assert path.stat().st_mtime_ns == first
    codegen._write_if_changed(path, codegen.render(spec) + "# changed\n")
    assert path.read_text().endswith("# changed\n")


def _render_into(cache: str) -> str:
    os.environ["DUSTIN_CACHE_DIR"] = cache
    spec = SPECS[0]
    for _ in range(20):
        codegen._write_if_changed(codegen.cache_dir() / f"{spec.uri()}.py", codegen.render(spec))
    return (codegen.cache_dir() / f"{spec.uri()}.py").read_text()


def test_concurrent_renders_agree(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        texts = pool.map(_render_into, [str(tmp_path)] * 4)
    assert len(set(texts)) == 1 and texts[0] == codegen.render(SPECS[0])
    assert not list((tmp_path / "generated").glob("*.tmp"))


def test_load_imports_the_rendered_module(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSTIN_CACHE_DIR", str(tmp_path))
    spec = KernelSpec("select_tokens", "interp", "fp32", block_size=4)
    module = codegen.load(spec)
    assert Path(module.__file__) == tmp_path / "generated" / f"{spec.uri()}.py"
    assert codegen.load(spec) is module


def test_print_command():
    uri = SPECS[0].uri()
    out = subprocess.run([sys.executable, "-m", "dustin_kernels.codegen", uri], capture_output=True, text=True,
                         check=True).stdout
    assert out == codegen.render(SPECS[0])


def test_templates_ship_in_the_wheel(tmp_path):
    """A wheel installed outside the repository finds and renders its templates."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("dustin_kernels-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import dustin_kernels, dustin_kernels.codegen as c, dustin_kernels.ref;"
            "from dustin_kernels.spec import KernelSpec;"
            "assert 'site' in dustin_kernels.__file__, dustin_kernels.__file__;"
            "print(c.render(KernelSpec.from_uri('sparse_verify_sm90_bf16_d128_g8_t5_bs1')).splitlines()[0])")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "DUSTIN_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sparse_verify_sm90_bf16_d128_g8_t5_bs1" in out.stdout

