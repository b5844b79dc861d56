"""The perf DB format: schema (good and bad files), buckets and keys, device names, atomic writes."""
import copy
import json
import os

import pytest

from dustin_kernels import codegen, perf_db

URI = "sparse_verify_sm90_bf16_d128_g8_t5_bs1"
CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "num_splits": 2, "HALF_PARTIALS": 0}
WORKLOAD = {"name": "sparse", "q_heads": 64, "kv_heads": 8, "head_dim": 128, "dtype": "bf16", "window": 5,
            "block_size": 1, "batch": 16, "context": 32768, "budget": 512, "heads": 4}


def make_entry(config=CONFIG, median=20.0, template_hash=None):
    return {"config": dict(config), "median_us": median, "iqr_us": 0.4, "gbs": 3100.0, "bw_fraction": 0.72,
            "runner_up": {"config": {**config, "num_splits": 4}, "median_us": median * 1.02},
            "default": {"config": {**config, "num_splits": 1}, "median_us": median * 1.5},
            "baseline": {"name": "dense_verify", "median_us": median * 30},
            "template_hash": template_hash or codegen.template_hash("sparse_verify"), "date": "2026-11-29T12:00:00Z",
            "trials": 120, "sampler": "tpe", "workload": dict(WORKLOAD), "interpret": False}


def make_meta():
    return {"gpu_name": "NVIDIA H200", "compute_capability": "9.0", "sm_count": 132, "driver": "580.159.03",
            "clocks": {"sm_max_mhz": 1980, "mem_max_mhz": 3201, "power_limit_w": 700.0}, "copy_gbs": 4300.0,
            "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "git_commit": "0" * 40,
            "template_hash": codegen.template_hash("sparse_verify"), "date": "2026-11-29T12:00:00Z",
            "sampler": "tpe", "seed": 0, "trials": 120, "interpret": False}


def make_doc(entries=None, device="nvidia_h200", arch="sm90", kernel="sparse_verify"):
    doc = perf_db.new_file(kernel, arch, device, make_meta())
    doc["entries"] = {f"{URI}|b16|c512": make_entry()} if entries is None else entries
    return doc


def test_schema_file_is_a_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(perf_db.schema())


def test_good_file_validates():
    assert perf_db.validate(make_doc()) == []
    assert perf_db.validate(make_doc(entries={})) == []


def _breaks(mutate):
    doc = make_doc()
    mutate(doc)
    return doc


ENTRY = f"{URI}|b16|c512"
BAD = {
    "no-meta": (lambda d: d.pop("_meta"), "_meta"),
    "old-version": (lambda d: d.update(schema_version=0), "schema_version"),
    "unknown-kernel": (lambda d: d.update(kernel="flash_attention"), "kernel"),
    "bad-key": (lambda d: d["entries"].update({"sparse_verify|16|512": make_entry()}), "entries"),
    "float-config": (lambda d: d["entries"][ENTRY]["config"].update(BLOCK_N=64.5), "config"),
    "zero-median": (lambda d: d["entries"][ENTRY].update(median_us=0), "median_us"),
    "no-runner-up": (lambda d: d["entries"][ENTRY].pop("runner_up"), "runner_up"),
    "extra-field": (lambda d: d["entries"][ENTRY].update(note="x"), "note"),
    "bad-hash": (lambda d: d["entries"][ENTRY].update(template_hash="xyz"), "template_hash"),
    "bad-date": (lambda d: d["_meta"].update(date="yesterday"), "date"),
    "meta-no-commit": (lambda d: d["_meta"].pop("git_commit"), "git_commit"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_fail_validation_naming_the_field(case):
    pytest.importorskip("jsonschema")
    mutate, field = BAD[case]
    errors = perf_db.validate(_breaks(mutate))
    assert errors and any(field in e for e in errors), errors


def test_structure_check_without_jsonschema(monkeypatch):
    """Where jsonschema is missing, the structure dispatch relies on is still checked."""
    import builtins

    real_import = builtins.__import__

    def no_jsonschema(name, *args, **kwargs):
        if name == "jsonschema":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    assert perf_db.validate(make_doc()) == []
    assert perf_db.validate(_breaks(BAD["float-config"][0]))
    assert perf_db.validate(_breaks(BAD["bad-key"][0]))
    assert perf_db.validate(_breaks(BAD["no-meta"][0]))


@pytest.mark.parametrize("batch, bucket", [(1, 1), (2, 2), (3, 4), (12, 16), (16, 16), (17, 32)])
def test_batch_bucket_is_the_next_power_of_two(batch, bucket):
    assert perf_db.batch_bucket(batch) == bucket


@pytest.mark.parametrize("context, bucket", [(1, 1), (512, 512), (8192, 8192), (11000, 8192), (12000, 16384),
                                             (32773, 32768), (100_000, 131072)])
def test_context_bucket_is_the_nearest_power_of_two_in_log_space(context, bucket):
    assert perf_db.context_bucket(context) == bucket


def test_keys_round_trip_and_bad_keys_raise():
    key = perf_db.entry_key(URI, 12, 30000)
    assert key == f"{URI}|b16|c32768"
    assert perf_db.parse_key(key) == (URI, 16, 32768, 0)
    assert perf_db.entry_key(URI, 12, 30000, 8) == f"{URI}|b16|c32768|h8"
    assert perf_db.parse_key(f"{URI}|b16|c32768|h8") == (URI, 16, 32768, 8)
    for bad in ("sparse_verify|b16", f"{URI}|b16|c32768|h0", f"{URI}|b16|c32768|h"):
        with pytest.raises(perf_db.PerfDBError, match="entry key"):
            perf_db.parse_key(bad)


@pytest.mark.parametrize("name, slug, family", [
    ("NVIDIA H200", "nvidia_h200", "h200"),
    ("NVIDIA H200 NVL", "nvidia_h200_nvl", "h200"),
    ("NVIDIA H100 80GB HBM3", "nvidia_h100_80gb_hbm3", "h100"),
    ("NVIDIA H100 PCIe", "nvidia_h100_pcie", "h100"),
    ("NVIDIA A100-SXM4-80GB", "nvidia_a100_sxm4_80gb", "a100"),
    ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090", "4090"),
    ("NVIDIA GH200 480GB", "nvidia_gh200_480gb", "gh200"),
])
def test_device_slug_and_family(name, slug, family):
    assert perf_db.device_slug(name) == slug
    assert perf_db.device_family(slug) == family


def test_write_is_canonical_and_round_trips(tmp_path):
    path = tmp_path / "sparse_verify" / "sm90" / "nvidia_h200.json"
    doc = make_doc()
    perf_db.write(path, doc)
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    assert perf_db.read(path) == doc
    assert [p.name for p in path.parent.iterdir()] == ["nvidia_h200.json"]  # no temporary left


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "db.json"
    perf_db.write(path, make_doc())
    before = path.read_text()
    bad = make_doc()
    bad["entries"][ENTRY]["median_us"] = -1.0
    with pytest.raises(perf_db.PerfDBError, match="refusing to write"):
        perf_db.write(path, bad)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    newer = make_doc(entries={})
    with pytest.raises(OSError, match="disk full"):
        perf_db.write(path, newer)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["db.json"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-json", "wrong-type", "bad-utf8", "deep", "huge-int"])
def test_unreadable_files_raise_naming_the_file(tmp_path, damage):
    path = tmp_path / "nvidia_h200.json"
    text = perf_db.dumps(make_doc())
    if damage == "bad-utf8":
        path.write_bytes(b"\xff\xfe" + text.encode())
    else:
        path.write_text({"truncated": text[: len(text) // 2], "empty": "", "not-json": "\x00\x01garbage",
                         "wrong-type": "[1, 2, 3]", "deep": '{"a": ' * 100000 + "1" + "}" * 100000,
                         "huge-int": text.replace('"schema_version": 1', '"schema_version": 1' + "0" * 5000)}[damage])
    with pytest.raises(perf_db.PerfDBError, match="nvidia_h200.json"):
        perf_db.read(path)


def test_update_merges_entries_and_replaces_meta(tmp_path):
    path = perf_db.path_for(tmp_path, "sparse_verify", "sm90", "nvidia_h200")
    perf_db.update(path, "sparse_verify", "sm90", "nvidia_h200", make_meta(), {ENTRY: make_entry()})
    meta = make_meta()
    meta["trials"] = 7
    other = f"{URI}|b1|c512"
    doc = perf_db.update(path, "sparse_verify", "sm90", "nvidia_h200", meta, {other: make_entry(median=9.0)})
    assert set(doc["entries"]) == {ENTRY, other}
    assert perf_db.read(path)["_meta"]["trials"] == 7
    with pytest.raises(perf_db.PerfDBError, match="holds"):
        perf_db.update(path, "sparse_verify", "sm80", "nvidia_h200", meta, {})


def test_update_refuses_to_overwrite_a_corrupt_file(tmp_path):
    path = tmp_path / "nvidia_h200.json"
    path.write_text('{"schema_version": 1, "entr')
    with pytest.raises(perf_db.PerfDBError, match="unreadable"):
        perf_db.update(path, "sparse_verify", "sm90", "nvidia_h200", make_meta(), {ENTRY: make_entry()})
    assert path.read_text() == '{"schema_version": 1, "entr'


def test_stale_keys_compare_template_hashes():
    doc = make_doc()
    doc["entries"]["old"] = copy.deepcopy(doc["entries"][ENTRY])
    doc["entries"]["old"]["template_hash"] = "0123456789abcdef"
    assert perf_db.stale_keys(doc, codegen.template_hash("sparse_verify")) == ["old"]


def test_files_lists_the_layout(tmp_path):
    perf_db.write(perf_db.path_for(tmp_path, "sparse_verify", "sm90", "nvidia_h200"), make_doc())
    perf_db.write(perf_db.path_for(tmp_path, "sparse_verify", "sm80", "nvidia_a100_sxm4_80gb"),
                  make_doc(entries={}, arch="sm80", device="nvidia_a100_sxm4_80gb"))
    assert [p.relative_to(tmp_path).as_posix() for p in perf_db.files(tmp_path)] == [
        "sparse_verify/sm80/nvidia_a100_sxm4_80gb.json", "sparse_verify/sm90/nvidia_h200.json"]
