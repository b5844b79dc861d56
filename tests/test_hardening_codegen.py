"""The render cache: a folder that cannot be used falls back to a private temporary folder, with one warning."""
import tempfile
from pathlib import Path

import pytest

from dustin_kernels import codegen
from dustin_kernels.spec import KernelSpec


@pytest.mark.parametrize("damage", ["file-in-the-way", "read-only"])
def test_an_unusable_cache_folder_falls_back_to_a_private_one(tmp_path, monkeypatch, damage):
    if damage == "file-in-the-way":
        (tmp_path / "cache").write_text("")  # DUSTIN_CACHE_DIR names a file: generated/ cannot be made
    else:  # a read-only folder (simulated: the tests may run as root, who writes anyway)
        real = tempfile.TemporaryFile

        def refuse(*args, dir=None, **kwargs):
            if Path(dir) == tmp_path / "cache" / "generated":
                raise PermissionError(13, "Permission denied")
            return real(*args, dir=dir, **kwargs)
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setenv("DUSTIN_CACHE_DIR", str(tmp_path / "cache"))
    specs = [KernelSpec("select_tokens", "interp", "fp32", block_size=bs) for bs in (32, 64)]
    codegen.load.cache_clear()
    codegen._render_dir.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"render cache {tmp_path / 'cache' / 'generated'}: not usable") as w:
            modules = [codegen.load(spec) for spec in specs]
    finally:
        codegen.load.cache_clear()
        codegen._render_dir.cache_clear()
    assert len([x for x in w if issubclass(x.category, RuntimeWarning)]) == 1  # one warning for both specs
    folders = {Path(m.__file__).parent for m in modules}
    assert len(folders) == 1 and folders.pop().name.startswith("dustin_kernels_generated_")
    assert all(hasattr(m, "select_tokens") for m in modules)
