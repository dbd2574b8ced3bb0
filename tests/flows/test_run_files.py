"""Run files (configs/*.yaml) validate against the flow's parameter models; bad ones fail naming the field."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from flows.curate_and_distill import main
from sd_distill.curate.config import CurateParams
from sd_distill.distill.config import DistillParams
from sd_distill.evaluate.config import EvaluateParams
from sd_distill.runfile import load_run_file

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_run_files_validate(path):
    params = load_run_file(path)
    assert set(params) == set(yaml.safe_load(path.read_text()))  # every key of the file, validated
    assert {"curate", "distill"} <= set(params)  # each shipped run file names its data and its method
    for key, model in (("curate", CurateParams), ("distill", DistillParams), ("evaluate", EvaluateParams)):
        assert key not in params or isinstance(params[key], model)


def test_the_readme_shows_the_webdataset_run_file_as_shipped():
    path = CONFIGS[0].parent / "webdataset-in-out.yaml"
    readme = (CONFIGS[0].parents[1] / "README.md").read_text()
    assert f"```yaml\n{path.read_text()}```" in readme
    params = load_run_file(path)
    assert {s.kind for s in params["curate"].sources} == {"webdataset"}
    assert params["curate"].output_formats == ["parquet", "webdataset"] and params["push_to_hub"].enabled is False


def test_unknown_top_level_key_is_named(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("curate: {}\ndistil: {}\n")
    with pytest.raises(ValueError, match=r"unknown keys \['distil'\]"):
        load_run_file(bad)


def test_invalid_field_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("distill:\n  method: {kind: magic}\n")
    with pytest.raises(ValidationError, match="kind"):
        load_run_file(bad)


def test_print_params_gives_json_for_prefect_deployment_run(tmp_path, capsys):
    import json

    main(["--config", str(CONFIGS[0]), "--print-params"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["distill"]["method"]["student_steps"] == 8
    assert printed["stage_deployments"]["distill"] == "distill/gpu"


def test_extra_students_from_a_run_file_share_the_teacher_and_get_their_own_rows(tmp_path):
    from sd_distill.evaluate.config import student_model_specs

    run = tmp_path / "run.yaml"
    run.write_text("distill: {teacher: toy:sd}\n"
                   "extra_students:\n  student-bk: {teacher: toy:sd, method: {student_arch: bk-small}}\n")
    params = load_run_file(run)
    assert params["extra_students"]["student-bk"].method.student_arch == "bk-small"
    rows = student_model_specs("student-bk", "/store/distill/student/k", 8)
    assert [(r.name, r.sampler, r.steps) for r in rows] == [("student-bk", "dpmsolver++", [8, 4]),
                                                           ("student-bk", "ddim", [8])]
    run.write_text("extra_students:\n  student-bk: {teacher: /other/teacher}\n")
    with pytest.raises(ValueError, match="compared with the one teacher"):
        load_run_file(run)
    run.write_text("extra_students:\n  teacher: {}\n")
    with pytest.raises(ValueError, match="extra student name 'teacher'"):
        load_run_file(run)


def test_the_demo_is_the_flows_defaults_and_fine_tunes_on_the_curated_set_first():
    """The demo deployment passes no parameters, so the parent flow's defaults are the demo (sd_distill/toy/demo.py);
    a run file's ``distill`` block replaces them whole (toy-quick.yaml: no fine-tune phase)."""
    import inspect

    from flows.curate_and_distill import curate_and_distill
    from sd_distill.distill.methods import plan_phases
    from sd_distill.toy.demo import DEMO_CURATE, DEMO_DISTILL, DEMO_TOY_N

    deployments = yaml.safe_load((CONFIGS[0].parents[1] / "deploy" / "prefect.yaml").read_text())["deployments"]
    assert next(d for d in deployments if d["name"] == "demo")["parameters"] == {}
    defaults = inspect.signature(curate_and_distill.fn).parameters
    assert defaults["curate"].default == DEMO_CURATE and defaults["distill"].default == DEMO_DISTILL
    assert [s.toy_n for s in DEMO_CURATE.sources] == [DEMO_TOY_N]
    assert [p.kind for p in plan_phases(DEMO_DISTILL.method)] == ["finetune", "cfg_aware"]
    quick = load_run_file(CONFIGS[0].parent / "toy-quick.yaml")
    assert [p.kind for p in plan_phases(quick["distill"].method)] == ["cfg_aware"]


def test_the_demo_light_deployment_is_demo_py_on_the_sd_layout_teacher_with_a_block_removed_student():
    """curate-and-distill/demo-light is DEMO_LIGHT: the demo's student on toy:sd-lpb2, and a BK-SDM-Tiny student
    (fine-tune, KD, CFG-aware) whose UNet needs at least 40% fewer MACs per evaluation."""
    from sd_distill.distill.config import DistillParams, check_extra_students
    from sd_distill.distill.methods import plan_phases
    from sd_distill.distill.methods.bksdm import block_removed_unet
    from sd_distill.evaluate.speed import unet_macs_per_eval
    from sd_distill.modelref import resolve_model_ref
    from sd_distill.toy.demo import DEMO_DISTILL, DEMO_LIGHT, DEMO_LIGHT_TEACHER

    deployments = yaml.safe_load((CONFIGS[0].parents[1] / "deploy" / "prefect.yaml").read_text())["deployments"]
    light = next(d for d in deployments if d["name"] == "demo-light")
    assert light["entrypoint"] == "flows/curate_and_distill.py:curate_and_distill"
    assert light["parameters"] == DEMO_LIGHT
    main = DistillParams.model_validate(DEMO_LIGHT["distill"])
    (bk,) = (DistillParams.model_validate(p) for p in DEMO_LIGHT["extra_students"].values())
    check_extra_students(main, {"student-bk-tiny": bk})
    assert main.model_copy(update={"teacher": DEMO_DISTILL.teacher}) == DEMO_DISTILL  # the demo's recipe
    assert [p.kind for p in plan_phases(bk.method)] == ["finetune", "bksdm_kd", "cfg_aware"]

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_ref(DEMO_LIGHT_TEACHER), local_files_only=True)
    teacher_macs = unet_macs_per_eval(pipe, 32)
    pipe.unet = block_removed_unet(pipe.unet, bk.method.student_arch)
    assert unet_macs_per_eval(pipe, 32) <= 0.6 * teacher_macs  # measured 42.7% fewer
