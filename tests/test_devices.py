"""--device on a machine without that device: a one-line usage error (exit 2) from every command line,
before any work."""
import importlib.util
from pathlib import Path

import pytest
import torch

from dustin_kernels import calibrate, demo, generate

TOOLS = Path(__file__).parent.parent / "tools"


def tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


MAINS = {"generate": (generate.main, ["--demo"]), "calibrate": (calibrate.main, ["--target", "t", "--draft", "d",
                                                                                   "--out", "p.json"]),
         "demo": (demo.main, []), "bench_kernels": (lambda a: tool("bench_kernels")(a), []),
         "eval_retrieval": (lambda a: tool("eval_retrieval")(a), ["--out", "x"])}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
@pytest.mark.parametrize("name", list(MAINS))
@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu"])
def test_an_absent_device_is_a_usage_error(name, device, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, argv = MAINS[name]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", device])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --device:" in err and len(err.strip().splitlines()[-1]) < 200, err
