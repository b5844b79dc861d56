"""Runtime dispatch: the lookup chain (device -> family -> arch -> default), buckets, warnings, the miss
counter, overrides, broken files, and no file IO per call."""
import os
import warnings

import pytest

from dustin_kernels import dispatch, perf_db
from dustin_kernels.spec import KernelSpec, Launch

from test_perf_db import CONFIG, make_doc, make_entry

SPEC = KernelSpec("sparse_verify", "sm90", "bf16", head_dim=128, group=8, window=5, block_size=1)
URI = SPEC.uri()
DEFAULT = {"BLOCK_N": 32, "num_warps": 8, "num_stages": 1, "num_splits": 1, "HALF_PARTIALS": 0}


def default_rule(launch):
    return dict(DEFAULT, num_splits=max(1, 64 // launch.batch))


def put(db, device, entries, arch="sm90"):
    perf_db.write(perf_db.path_for(db, "sparse_verify", arch, device),
                  make_doc(entries={f"{URI.replace('sm90', arch)}|{k}": v for k, v in entries.items()},
                           device=device, arch=arch))


def cfg(**changes):
    return {**CONFIG, **changes}


@pytest.fixture
def db(tmp_path):
    """An empty DB folder that dispatch reads, on a pretended 'NVIDIA H200'."""
    with dispatch.using(db=tmp_path, device="NVIDIA H200"):
        yield tmp_path


def lookup(batch=16, context=512, spec=SPEC, kv_heads=0):
    return dispatch.config_for(Launch(spec, batch, context, kv_heads), default_rule)


def test_exact_device_hit_with_batch_bucket_and_log_space_context(db):
    put(db, "nvidia_h200", {"b16|c8192": make_entry(cfg(num_splits=2)), "b16|c32768": make_entry(cfg(num_splits=8)),
                            "b1|c8192": make_entry(cfg(num_splits=32))})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a hit says nothing
        assert lookup(16, 8192)["num_splits"] == 2
        assert lookup(12, 8192)["num_splits"] == 2  # batch 12 -> bucket 16
        assert lookup(16, 12000)["num_splits"] == 2  # log2 13.55: nearer 8192 (13) than 32768 (15)
        assert lookup(16, 20000)["num_splits"] == 8  # log2 14.29: nearer 32768
        assert lookup(16, 1 << 20)["num_splits"] == 8
        assert lookup(1, 100)["num_splits"] == 32
    assert dispatch.misses() == {}


def test_a_context_halfway_between_two_buckets_takes_the_larger(db):
    """The documented tie rule: 8192 is one octave from both 4096 and 16384; the larger bucket wins
    (whatever the order of the entries in the file)."""
    put(db, "nvidia_h200", {"b16|c16384": make_entry(cfg(num_splits=8)), "b16|c4096": make_entry(cfg(num_splits=2))})
    assert lookup(16, 8192)["num_splits"] == 8
    assert lookup(16, 8191)["num_splits"] == 2  # just below the middle: the nearer, smaller bucket
    put(db, "nvidia_h200", {"b16|c1024": make_entry(cfg(num_splits=1)), "b16|c256": make_entry(cfg(num_splits=2))})
    dispatch.reset()
    assert lookup(16, 512)["num_splits"] == 1 and lookup(16, 511)["num_splits"] == 2


def test_miss_falls_back_to_the_default_rule_warns_once_and_counts(db):
    put(db, "nvidia_h200", {"b16|c8192": make_entry()})
    with pytest.warns(dispatch.PerfDBWarning, match=r"no tuned config .*batch bucket 8.*default rule") as caught:
        assert lookup(5, 8192) == default_rule(Launch(SPEC, 5, 8192))
        assert lookup(6, 8192) == default_rule(Launch(SPEC, 6, 8192))  # same bucket: no second warning
    assert len([w for w in caught if "no tuned config" in str(w.message)]) == 1
    assert dispatch.misses() == {f"{URI}|b8|nvidia_h200": 2}


def test_family_then_arch_fallbacks(db):
    put(db, "nvidia_h200_nvl", {"b16|c512": make_entry(cfg(num_splits=3))})  # same family as H200
    put(db, "nvidia_h100_80gb_hbm3", {"b16|c512": make_entry(cfg(num_splits=6)),
                                      "b4|c512": make_entry(cfg(num_splits=8))})  # same arch only
    with pytest.warns(dispatch.PerfDBWarning, match="tuned on nvidia_h200_nvl .same family"):
        assert lookup(16)["num_splits"] == 3
    with pytest.warns(dispatch.PerfDBWarning, match="tuned on nvidia_h100_80gb_hbm3 .same arch"):
        assert lookup(4)["num_splits"] == 8
    put(db, "nvidia_h200", {"b16|c512": make_entry(cfg(num_splits=1))})
    dispatch.reset()
    assert lookup(16)["num_splits"] == 1  # the exact device wins once it has the bucket
    with dispatch.using(device="NVIDIA H100 PCIe"):
        with pytest.warns(dispatch.PerfDBWarning, match="tuned on nvidia_h100_80gb_hbm3 .same family"):
            assert lookup(16)["num_splits"] == 6


def test_other_arch_files_are_not_used(db):
    put(db, "nvidia_a100_sxm4_80gb", {"b16|c512": make_entry(cfg(num_splits=4))}, arch="sm80")
    with pytest.warns(dispatch.PerfDBWarning, match="no tuned config"):
        assert lookup(16) == default_rule(Launch(SPEC, 16, 512))


def test_interpreter_misses_are_counted_but_silent(db):
    spec = KernelSpec("sparse_verify", "interp", "bf16", head_dim=64, group=4, window=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup(2, 32, spec) == default_rule(Launch(spec, 2, 32))
    assert dispatch.misses() == {f"{spec.uri()}|b2|cpu": 1}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "schema"])
def test_broken_file_warns_and_the_chain_goes_on(db, damage):
    put(db, "nvidia_h200_nvl", {"b16|c512": make_entry(cfg(num_splits=3))})
    path = perf_db.path_for(db, "sparse_verify", "sm90", "nvidia_h200")
    text = perf_db.dumps(make_doc(entries={f"{URI}|b16|c512": make_entry(cfg(num_splits=8))}))
    path.write_text({"truncated": text[:200], "garbage": "\x00" * 10,
                     "schema": text.replace('"num_splits": 8', '"num_splits": "eight"')}[damage])
    with pytest.warns(dispatch.PerfDBWarning) as caught:
        assert lookup(16)["num_splits"] == 3  # the broken exact-device file is skipped, the family file used
    messages = " ".join(str(w.message) for w in caught)
    assert "nvidia_h200.json" in messages and "ignored" in messages
    path.with_name("nvidia_h200_nvl.json").unlink()
    dispatch.reset()
    with pytest.warns(dispatch.PerfDBWarning):
        assert lookup(16) == default_rule(Launch(SPEC, 16, 512))  # and with nothing else: the default


def test_stale_entries_are_used_with_a_warning(db):
    put(db, "nvidia_h200", {"b16|c512": make_entry(cfg(num_splits=6), template_hash="0123456789abcdef")})
    with pytest.warns(dispatch.PerfDBWarning, match="stale"):
        assert lookup(16)["num_splits"] == 6


@pytest.mark.parametrize("config, problem", [
    ({"BLOCK_N": 64, "num_warps": 4}, "expected the parameters"),
    (cfg(num_splits=0), "num_splits: expected one of"),
    (cfg(BLOCK_N=3), "BLOCK_N: expected one of"),
    (cfg(BLOCK_N=64.0), "BLOCK_N: expected one of .* got 64.0"),
    (cfg(num_splits=1, HALF_PARTIALS=1), "violates 'not HALF_PARTIALS"),
    (cfg(num_splits=16), "violates 'num_splits \\* BLOCK_N"),  # 16 splits of 64 rows: past a 512-slot context
], ids=["keys", "splits0", "block3", "block-float", "half1split", "splits-past-context"])
def test_entries_outside_the_search_space_give_the_default_rule(db, config, problem):
    put(db, "nvidia_h200", {"b16|c512": make_entry(config), "b16|c8192": make_entry(cfg(num_splits=8))})
    with pytest.warns(dispatch.PerfDBWarning, match=f"entry {URI}.b16.c512 has an invalid config .*{problem}"):
        assert lookup(16, 512) == default_rule(Launch(SPEC, 16, 512))
    assert lookup(16, 8192)["num_splits"] == 8  # the file's valid entries are still used
    assert dispatch.misses() == {f"{URI}|b16|nvidia_h200": 1}


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_only_regular_files_are_read(db, kind):
    path = perf_db.path_for(db, "sparse_verify", "sm90", "nvidia_h200")
    path.parent.mkdir(parents=True)
    os.mkfifo(path) if kind == "fifo" else path.mkdir()  # a FIFO would block the first op call on open()
    with pytest.warns(dispatch.PerfDBWarning) as caught:
        assert lookup(16) == default_rule(Launch(SPEC, 16, 512))
    messages = [str(w.message) for w in caught]
    assert any("nvidia_h200.json: unreadable perf DB file (OSError: not a regular file)" in m for m in messages)
    assert any("no tuned config" in m for m in messages)


def test_files_are_read_once(db, monkeypatch):
    put(db, "nvidia_h200", {"b16|c512": make_entry()})
    reads = []
    real_read = perf_db.read
    monkeypatch.setattr(perf_db, "read", lambda path: reads.append(path) or real_read(path))
    for batch in (16, 16, 12, 9, 16):
        lookup(batch)
    with pytest.warns(dispatch.PerfDBWarning):
        lookup(2)
    assert len(reads) == 1


def test_repeated_misses_do_no_per_call_string_work(db, monkeypatch):
    """A miss is resolved once; later calls of the same bucket only count (no uri formatting per call)."""
    with pytest.warns(dispatch.PerfDBWarning):
        lookup(16)
    uris = []
    real_uri = KernelSpec.uri
    monkeypatch.setattr(KernelSpec, "uri", lambda self: uris.append(1) or real_uri(self))
    for _ in range(50):
        assert lookup(16) == default_rule(Launch(SPEC, 16, 512))
    assert uris == []
    assert dispatch.misses() == {f"{URI}|b16|nvidia_h200": 51}


def test_returned_configs_are_copies(db):
    put(db, "nvidia_h200", {"b16|c512": make_entry()})
    lookup(16)["num_splits"] = 99
    assert lookup(16)["num_splits"] == CONFIG["num_splits"]


def test_override_wins_innermost_first_and_is_undone(db):
    put(db, "nvidia_h200", {"b16|c512": make_entry()})
    other = KernelSpec("sparse_verify", "sm90", "bf16", head_dim=64, group=4, window=5)
    with dispatch.override({"BLOCK_N": 16}, kernel="sparse_verify"):
        assert lookup(16) == {"BLOCK_N": 16}
        with dispatch.override({"BLOCK_N": 128}, spec=SPEC):
            assert lookup(16) == {"BLOCK_N": 128}
            assert lookup(16, spec=other) == {"BLOCK_N": 16}
        with dispatch.override({"BLOCK_N": 32}, kernel="attention_scores"):
            assert lookup(16) == {"BLOCK_N": 16}
    with pytest.raises(KeyError), dispatch.override({"BLOCK_N": 8}):
        raise KeyError("inside")
    assert lookup(16) == CONFIG
    with pytest.raises(ValueError, match="at most one"), dispatch.override({}, kernel="x", spec=SPEC):
        pass


def test_record_collects_the_calls(db):
    with dispatch.record() as calls, dispatch.override(CONFIG):
        lookup(16, 512)
    assert calls == [(Launch(SPEC, 16, 512), default_rule)]


def test_environment_variable_points_at_another_db(tmp_path, monkeypatch):
    put(tmp_path, "nvidia_h200", {"b16|c512": make_entry(cfg(num_splits=6))})
    monkeypatch.setenv("DUSTIN_PERF_DB", str(tmp_path))
    with dispatch.using(device="NVIDIA H200"):
        assert dispatch.db_root() == tmp_path
        assert lookup(16)["num_splits"] == 6


def test_the_package_db_is_the_default(monkeypatch):
    monkeypatch.delenv("DUSTIN_PERF_DB", raising=False)
    with dispatch.using():
        assert dispatch.db_root() == perf_db.root()
    assert (perf_db.root() / "schema.json").is_file()


def test_kv_heads_are_part_of_the_key(db):
    """An op whose config depends on the KV heads (sparse_verify's split count) keys its entries by them:
    an entry tuned at 8 KV heads never serves a launch over 2."""
    put(db, "nvidia_h200", {"b16|c512|h8": make_entry(cfg(num_splits=2)), "b16|c512": make_entry(cfg(num_splits=6))})
    assert lookup(16, 512, kv_heads=8)["num_splits"] == 2
    assert lookup(16, 512)["num_splits"] == 6
    with pytest.warns(dispatch.PerfDBWarning, match="with 2 KV heads"):
        assert lookup(16, 512, kv_heads=2) == default_rule(Launch(SPEC, 16, 512, 2))
    assert dispatch.misses() == {f"{URI}|b16|h2|nvidia_h200": 1}
