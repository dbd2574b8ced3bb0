"""Stage store contract (docs/design.md, "The stage store"): content-addressed, atomic, manifest with sha256 of every file."""

import json
import threading
import time

import pytest

from sd_distill.store import Manifest, StageStore, sha256_file, stage_key


def test_key_depends_on_params_upstream_and_code_version():
    up = Manifest(stage="a", key="k1", uri="/x")
    base = stage_key("s", {"a": 1}, [up], "1")
    assert base == stage_key("s", {"a": 1}, [up], "1")
    assert base != stage_key("s", {"a": 2}, [up], "1")
    assert base != stage_key("s", {"a": 1}, [Manifest(stage="a", key="k2", uri="/x")], "1")
    assert base != stage_key("s", {"a": 1}, [up], "2")


def test_build_writes_manifest_with_file_hashes_and_reuses(tmp_path):
    store = StageStore(tmp_path)
    with store.build("curate/x", {"n": 1}) as b:
        (b.path / "sub").mkdir()
        (b.path / "sub" / "f.bin").write_bytes(b"hello")
        b.counts["rows"] = 7
    m = b.manifest
    assert m.path == tmp_path / "curate" / "x" / m.key
    data = json.loads((m.path / "manifest.json").read_text())
    assert data["counts"] == {"rows": 7}
    assert data["files"] == [{"path": "sub/f.bin", "size": 5, "sha256": sha256_file(m.path / "sub" / "f.bin")}]
    assert store.verify(m) == []
    with store.build("curate/x", {"n": 1}) as again:
        assert again.reused and again.manifest.key == m.key
    (m.path / "sub" / "f.bin").write_bytes(b"tampered")
    assert store.verify(m) == ["sub/f.bin: changed"]


def test_crash_leaves_no_finished_looking_folder(tmp_path):
    store = StageStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.build("s", {"n": 1}) as b:
            (b.path / "half.txt").write_text("partial")
            raise RuntimeError("boom")
    assert store.manifests("s") == []
    assert [p for p in (tmp_path / "s").iterdir() if not p.name.startswith(".")] == [], "the temporary folder is removed"


def test_concurrent_identical_builds_have_one_winner_and_no_duplicate_work(tmp_path):
    store = StageStore(tmp_path)
    start = threading.Barrier(4)
    results, built = [], []

    def build(i):
        start.wait()
        with store.build("race", {"same": True}) as b:
            if not b.reused:
                built.append(i)
                (b.path / "out.txt").write_text(f"writer {i}")
                time.sleep(0.2)  # the others arrive while this build is still running
        results.append(b.manifest)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(built) == 1, "the lock lets one build run; the others reuse its folder"
    assert len({m.key for m in results}) == 1 and len(results) == 4
    assert (results[0].path / "out.txt").read_text() == f"writer {built[0]}"
    assert store.verify(results[0]) == []
    assert [p.name for p in (tmp_path / "race").iterdir() if not p.name.startswith(".")] == [results[0].key]


def test_fsspec_memory_store_round_trip():
    store = StageStore("memory://stages-test")
    with store.build("s", {"n": 2}) as b:
        (b.path / "a.txt").write_text("remote")
    m = store.find("s", b.key)
    assert m is not None and m.uri.startswith("memory://")
    with store.local_copy(m) as folder:
        assert (folder / "a.txt").read_text() == "remote"
    assert store.verify(m) == []
