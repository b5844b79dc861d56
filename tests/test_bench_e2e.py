"""tools/bench_e2e.py runs tiny on CPU: rows per policy with a profile of the eager step whose phases add
up to the step, a bytes floor, top ops, plots, compile counts, and the paper-shape model from the committed
H200 timings; the profile's CUDA side (launches, kernels matched to their launch calls, syncs) on hand-made
torch.profiler events."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from dustin_kernels.policies import PHASES

TOOL = Path(__file__).parent.parent / "tools" / "bench_e2e.py"
PHASE_FIELDS = ("draft", "selection", "target_attention", "rest_of_target", "rest_of_step")


def load():
    spec = importlib.util.spec_from_file_location("bench_e2e", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run(tmp_path):
    bench = load()
    assert bench.main(["--out", str(tmp_path), "--contexts", "300", "--batches", "1", "--new-tokens", "8",
                       "--policies", "plain", "dense", "dustin"]) == 0
    result = json.loads((tmp_path / "bench_e2e.json").read_text())
    rows = {r["policy"]: r for r in result["rows"]}
    assert list(rows) == ["plain", "dense", "dustin"] and all(r["recall"] == 1.0 for r in rows.values())
    assert rows["plain"]["ms_draft"] < rows["dense"]["ms_draft"] and rows["dustin"]["ms_selection"] > 0
    for r in rows.values():
        assert 0 < r["floor_ms_per_step"] and 0 < r["floor_fraction"] and r["tokens_per_s"] > 0
        for quantity, step in (("ms", "ms_per_step_profiled"), ("ops", "ops_per_step"), ("syncs", "syncs_per_step")):
            parts = [r[f"{quantity}_{phase}"] for phase in PHASE_FIELDS]
            assert min(parts) >= 0 and sum(parts) == pytest.approx(r[step], abs=0.01), (r["policy"], quantity)
        assert r["ops_per_step"] > 0 and r["syncs_per_step"] <= 3
        assert all(r[f"{q}_{phase}"] is None for q in ("device_ms", "launches") for phase in PHASE_FIELDS)
        assert r["device_ms_per_step"] is r["launches_per_step"] is r["host_bound"] is r["device_unmatched"] is None
        assert r["compile_s"] is None and r["graphs_built"] == r["graphs_built_timed"] == r["cudagraph_skips"] == 0
    assert rows["plain"]["ops_per_step"] < rows["dense"]["ops_per_step"] and rows["plain"]["ops_draft"] == 0
    for name in ("dense", "dustin"):  # the step itself never waits for the device: lengths stay on it
        assert rows[name]["syncs_draft"] == rows[name]["syncs_selection"] == rows[name]["syncs_target_attention"] == 0
    top = list(csv.DictReader(open(tmp_path / "top_ops.csv")))
    assert {r["policy"] for r in top} == set(rows) and all(float(r["self_host_ms_per_step"]) >= 0 for r in top)
    assert (tmp_path / "tokens_per_s.png").stat().st_size and (tmp_path / "breakdown.png").stat().st_size
    assert (tmp_path / "bench_e2e.csv").read_text().count("\n") == 4
    paper = result["paper_shape"]
    assert paper["step_ms"]["dustin"] < paper["step_ms"]["dense"] < paper["step_ms"]["plain"] + 20
    assert all(r["dustin_over_dense"] > 1 for r in paper["rows"])


def test_compiled_run_builds_its_graph_in_the_warm_up(tmp_path):
    bench = load()
    torch._dynamo.reset()  # no graph left by another test
    assert bench.main(["--out", str(tmp_path), "--contexts", "300", "--batches", "1", "--new-tokens", "8",
                       "--policies", "dustin", "--compile", "aot_eager", "--draft-kv-heads", "1"]) == 0
    result = json.loads((tmp_path / "bench_e2e.json").read_text())
    (row,) = result["rows"]
    assert result["meta"]["testbed"]["draft_kv_heads"] == 1 and row["recall"] == 1.0
    assert row["graphs_built"] >= 1 and row["graphs_built_timed"] == 0 and row["compile_s"] > 0
    assert row["ops_per_step"] > 0 and row["ms_per_step_eager"] > 0


class Trace:
    """FunctionEvents as torch.profiler makes them on CUDA: ops, ranges and CUDA API calls on the host (each
    nested under its caller), kernels and copies on the device carrying their launch call's correlation id."""

    def __init__(self):
        self.events, self.next_id = [], 1000

    def host(self, name, start, end, parent=None, thread=1, **kw):
        e = FunctionEvent(id=0, name=name, thread=thread, start_us=start, end_us=end, use_device="cuda", **kw)
        if parent is not None:
            parent.append_cpu_child(e)
            e.set_cpu_parent(parent)
        self.events.append(e)
        return e

    def launch(self, name, start, device_us, parent=None):
        """A CUDA API call at `start` (from an op: `parent`; from Python: none, on CUPTI's own thread id) and the
        device work it queued."""
        self.next_id += 1
        call = self.host(name, start, start + 1, parent, thread=1 if parent else 77)
        call.id = self.next_id
        if device_us:
            self.device(f"kernel {self.next_id}", device_us, self.next_id)
        return call

    def device(self, name, us, corr, **kw):
        self.events.append(FunctionEvent(id=corr, name=name, thread=0, start_us=5e5, end_us=5e5 + us,
                                         device_type=DeviceType.CUDA, use_device="cuda", **kw))

    def step(self, b):
        """One loop iteration at time b: per phase, device us 12 / 2 + 1 / 11 / 3 / 1, launches 2 / 2 / 1 / 1 / 0,
        ops 1 / 0 / 1 / 1 / 2, syncs 0 / 0 / 0 / 0 / 2; host us 30 / 9 + 3 / 14 / 39 - 17 / 100 - 78."""
        draft = self.host(PHASES["draft"], b, b + 30, is_user_annotation=True)
        linear = self.host("aten::linear", b + 1, b + 10, draft)
        runtime = self.launch("cudaLaunchKernel", b + 3, 5, self.host("aten::addmm", b + 2, b + 9, linear))
        self.launch("cuLaunchKernel", b + 3, 0, runtime)  # the driver call inside it: one launch
        self.launch("cuLaunchKernelEx", b + 12, 7)  # Triton, from Python
        self.host(PHASES["select"], b + 31, b + 40, is_user_annotation=True)
        self.launch("cuLaunchKernelEx", b + 33, 2)
        target = self.host(PHASES["target"], b + 41, b + 80, is_user_annotation=True)
        self.host(PHASES["refine"], b + 42, b + 45, target, is_user_annotation=True)
        self.launch("cuLaunchKernelEx_ptsz", b + 43, 1)
        attention = self.host(PHASES["attention"], b + 46, b + 60, target, is_user_annotation=True)
        self.host("aten::empty", b + 47, b + 48, attention)
        corr = self.launch("cuLaunchKernelEx", b + 50, 11).id
        self.device(PHASES["attention"], 11, corr, is_user_annotation=True)  # the range's GPU span: not a kernel
        self.launch("cudaLaunchKernel", b + 62, 3, self.host("aten::mm", b + 61, b + 70, target))
        item = self.host("aten::item", b + 82, b + 90)
        scalar = self.host("aten::_local_scalar_dense", b + 83, b + 89, item)
        self.launch("cudaMemcpyAsync", b + 84, 1, scalar)
        self.launch("cudaStreamSynchronize", b + 86, 0, scalar)
        copy = self.host("aten::copy_", b + 92, b + 96, self.host("aten::to", b + 91, b + 97))
        self.launch("cudaStreamSynchronize_v3020", b + 93, 0, copy)


def test_summary_of_a_cuda_profile():
    bench = load()
    trace = Trace()
    for step in range(4):  # the window: steps 1 and 2
        trace.step(100 * step)
    trace.device("a kernel whose launch the profile lacks", 30, 1)
    profile = bench.summarize(trace.events, 4, cuda=True)
    fields = bench.profile_fields(profile.per_step)
    expect = {"ms": (0.03, 0.012, 0.014, 0.022, 0.022, 0.1), "device_ms": (0.012, 0.003, 0.011, 0.003, 0.001, 0.03),
              "launches": (2, 2, 1, 1, 0, 6), "ops": (1, 0, 1, 1, 2, 5), "syncs": (0, 0, 0, 0, 2, 2)}
    for quantity, values in expect.items():
        step = "ms_per_step_profiled" if quantity == "ms" else f"{quantity}_per_step"
        got = [fields[f"{quantity}_{phase}"] for phase in PHASE_FIELDS] + [fields[step]]
        assert got == pytest.approx(values, abs=1e-9), quantity
    assert profile.device_unmatched == pytest.approx(30 / (30 + 4 * 30))
    top = {r["op"]: r for r in profile.top_ops}
    assert top[PHASES["draft"]]["device_ms_per_step"] == pytest.approx(0.007)  # its Python launch
    assert top["aten::addmm"]["device_ms_per_step"] == pytest.approx(0.005)
    assert top[PHASES["attention"]]["device_ms_per_step"] == pytest.approx(0.011)
    assert top["aten::item"]["calls_per_step"] == 1 and top[bench.OUTSIDE]["calls_per_step"] is None


def test_profile_needs_a_draft_range_per_step():
    bench = load()
    trace = Trace()
    for step in range(3):
        trace.step(100 * step)
    with pytest.raises(RuntimeError, match="one 'dustin.draft' range per step"):
        bench.summarize(trace.events, 4, cuda=True)


def test_bad_arguments(tmp_path, capsys):
    bench = load()
    for argv in (["--budget", "8"], ["--contexts", "10"], ["--draft-kv-heads", "3"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(["--out", str(tmp_path), *argv])
        assert exc.value.code == 2


def test_a_failing_policy_costs_only_its_row(tmp_path, monkeypatch):
    bench = load()
    measure = bench.measure

    def flaky(spec, draft, target, name, *args):
        if name == "dense":
            raise RuntimeError("no kernel for you")
        return measure(spec, draft, target, name, *args)

    monkeypatch.setattr(bench, "measure", flaky)
    assert bench.main(["--out", str(tmp_path), "--contexts", "300", "--batches", "1", "--new-tokens", "4",
                       "--policies", "plain", "dense"]) == 1
    rows = json.loads((tmp_path / "bench_e2e.json").read_text())["rows"]
    assert rows[1] == {"policy": "dense", "context": 300, "batch": 1, "error": "RuntimeError: no kernel for you"}
    assert rows[0]["tokens_per_s"] > 0
    table = list(csv.DictReader(open(tmp_path / "bench_e2e.csv")))
    assert [r["policy"] for r in table] == ["plain", "dense"] and table[1]["error"] and not table[0]["error"]
