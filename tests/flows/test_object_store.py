"""Stage store and Prefect results on an object store: a real S3 API (moto's server on 127.0.0.1) through s3fs.

Proves that ``store_root: s3://bucket/...`` works for the whole DAG (every stage folder lands in the bucket,
a rerun reuses them), that Prefect's result storage can be an S3 block (what a parent flow on one host needs
to read a stage deployment's result from another), and that remote stage folders are copied locally once
and checked against their manifest.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

moto_server = pytest.importorskip("moto.server")
fsspec = pytest.importorskip("fsspec")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on a free loopback port with bucket ``cad``; fsspec's s3 protocol points at it."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": url,  # subprocesses (training) read fsspec's config from the environment
           "SD_DISTILL_CACHE": str(tmp_path_factory.mktemp("stage-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_conf = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"endpoint_url": url}
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="cad")
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        fsspec.config.conf.pop("s3", None) if saved_conf is None else fsspec.config.conf.__setitem__("s3", saved_conf)


def _bucket():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return fsspec.filesystem("s3")


def test_stage_folder_is_uploaded_with_its_manifest_last_and_reused(s3):
    from sd_distill.store import StageStore

    store = StageStore("s3://cad/unit")
    with store.build("unit/a", {"n": 2}) as b:
        (b.path / "sub").mkdir()
        (b.path / "sub" / "x.txt").write_text("hello")
        b.counts["n"] = 2
    m = b.manifest
    assert m.uri == f"s3://cad/unit/unit/a/{m.key}"
    assert _bucket().cat(f"cad/unit/unit/a/{m.key}/sub/x.txt") == b"hello"
    with store.build("unit/a", {"n": 2}) as again:
        assert again.reused and again.manifest.key == m.key
    # .path is a verified local copy, made once
    local = m.path
    assert (local / "sub" / "x.txt").read_text() == "hello"
    assert str(local).startswith(os.environ["SD_DISTILL_CACHE"])
    assert m.path == local and store.verify(m) == []


def test_folder_without_manifest_is_not_finished(s3):
    from sd_distill.store import StageStore

    fs = _bucket()
    fs.pipe("cad/partial/unit/b/deadbeef/half.bin", b"1234")  # an upload that died before its manifest
    store = StageStore("s3://cad/partial")
    assert store.find("unit/b", "deadbeef") is None
    assert store.manifests("unit/b") == []


def test_changed_remote_file_is_refused_when_copied(s3):
    from sd_distill.store import StageStore, load_manifest

    store = StageStore("s3://cad/tamper")
    with store.build("unit/c", {"n": 1}) as b:
        (b.path / "w.bin").write_bytes(b"\x00" * 64)
    _bucket().pipe(f"cad/tamper/unit/c/{b.key}/w.bin", b"\x01" * 64)
    with pytest.raises(OSError, match="w.bin.*sha256"):
        _ = load_manifest(b.manifest.uri).path


def test_model_ref_to_a_remote_stage_folder_resolves_to_its_local_copy(s3):
    from sd_distill.modelref import resolve_model_ref
    from sd_distill.store import StageStore

    store = StageStore("s3://cad/models")
    with store.build("distill/student", {"k": 1}) as b:
        (b.path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    folder = Path(resolve_model_ref(b.manifest.uri))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.slow
def test_whole_dag_on_s3_store_and_s3_result_storage_then_cached_rerun(s3, prefect_harness):
    """Every stage folder and every Prefect result in the bucket; a rerun builds nothing new."""
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    from flows.curate_and_distill import curate_and_distill
    from sd_distill.curate.config import CurateParams
    from sd_distill.distill.config import DistillParams

    RemoteFileSystem(basepath="s3://cad/results", settings={"endpoint_url": s3, "key": "test", "secret": "test"}
                     ).save("cad-results", overwrite=True)
    params = dict(curate=CurateParams.model_validate({"sources": [{"kind": "toy", "toy_n": 32}]}),
                  distill=DistillParams.model_validate({"teacher": "toy:sd-lpb2", "method": {"finetune_steps": 2},
                                                        "trainer": {"max_steps": 4}}),
                  toy_eval_prompts=4, store_root="s3://cad/dag",
                  # a second student from the same curated set, block-removed: its own KD, step and student stages,
                  # the latent cache and the fine-tune phase shared
                  extra_students={"student-bk": DistillParams.model_validate(
                      {"teacher": "toy:sd-lpb2", "method": {"finetune_steps": 2, "student_arch": "bk-tiny", "kd_steps": 2},
                       "trainer": {"max_steps": 4}})})
    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: "remote-file-system/cad-results"}):
        summary = curate_and_distill(**params)
        fs = _bucket()
        manifests = sorted(fs.glob("cad/dag/**/manifest.json"))
        stages = {"/".join(p.split("/")[2:-1][:-1]) for p in manifests}
        assert {"curate/sources", "curate/download", "curate/score", "curate/caption", "curate/shards",
                "distill/cache", "distill/phase-finetune-2", "distill/phase-bksdm-kd-bk-tiny-2",
                "distill/phase-cfg-aware-16-8", "distill/student", "evaluate/toy-prompts",
                "evaluate/model-teacher", "evaluate/model-student", "evaluate/model-student-ddim",
                "evaluate/report", "evaluate/model-student-bk", "evaluate/model-student-bk-ddim"} <= stages, stages
        def count(stage):
            return sum(p.split("/")[2:-2] == stage.split("/") for p in manifests)

        assert (count("distill/cache"), count("distill/phase-finetune-2"), count("distill/phase-cfg-aware-16-8"),
                count("distill/student")) == (1, 1, 2, 2)
        assert "| student-bk |" in summary
        assert "s3://cad/dag/distill/student/" in summary and "Toy world" in summary
        assert fs.cat("cad/dag/latest-summary.md").decode() == summary
        assert fs.ls("cad/results"), "Prefect results were not written to the S3 block"
        created = {p: json.loads(fs.cat(p))["created"] for p in manifests}

        again = curate_and_distill(**params)
        fs = _bucket()
        assert sorted(fs.glob("cad/dag/**/manifest.json")) == manifests, "the rerun built new stage folders"
        assert {p: json.loads(fs.cat(p))["created"] for p in manifests} == created
        assert again == summary
