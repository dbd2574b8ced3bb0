"""The BK-SDM KD phase before step distillation (``method.kd_steps``): a block-removed student trained by BK-SDM's
task + output + feature KD against the (fine-tuned) teacher, then step-distilled as the teacher of the step phases,
as the reference distils BK-SDM-Tiny. Pinned: its place in the cfg_aware and progressive plans, the settings it is
refused with, and the whole chain fine-tune -> KD -> CFG-aware through ``sd_distill.distill.run.distill``."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from sd_distill.distill.methods import MethodConfig, plan_phases
from tests._fixtures_distill import tiny_params


@pytest.mark.parametrize("kind", ["cfg_aware", "progressive"])
@pytest.mark.parametrize("finetune_steps", [0, 50])
def test_plans_put_the_kd_phase_between_the_finetune_and_the_step_phases(kind, finetune_steps):
    base = dict(kind=kind, teacher_steps=16, student_steps=8, progressive_start_steps=32, student_arch="bk-tiny",
                finetune_steps=finetune_steps)
    plain = plan_phases(MethodConfig(**base))
    with_kd = plan_phases(MethodConfig(**base, kd_steps=300, kd_lr=1e-4, kd_batch_size=32))
    n_ft = 1 if finetune_steps else 0
    kd = with_kd[n_ft]
    assert (kd.kind, kd.index, kd.name, kd.max_steps, kd.lr, kd.batch_size) == \
        ("bksdm_kd", n_ft, "bksdm-kd-bk-tiny-300", 300, 1e-4, 32)
    assert [p.index for p in with_kd] == list(range(len(plain) + 1))
    assert [(p.name, p.kind) for p in with_kd[:n_ft] + with_kd[n_ft + 1:]] == [(p.name, p.kind) for p in plain]
    # only the phase right after a fine-tune makes a new (block-removed) student; the step phases start from the KD's
    assert [p.new_student for p in with_kd] == [bool(n_ft) and i == n_ft for i in range(len(with_kd))]


def test_kd_steps_is_refused_where_it_has_no_meaning():
    assert MethodConfig().kd_steps == 0  # off by default
    with pytest.raises(ValidationError, match="block-removed student_arch"):
        MethodConfig(kd_steps=10)  # student_arch "same": nothing to KD
    with pytest.raises(ValidationError, match="kind cfg_aware or progressive"):
        MethodConfig(kind="w_conditioned", student_arch="bk-small", kd_steps=10)
    with pytest.raises(ValidationError, match="trains trainer.max_steps KD steps itself"):
        MethodConfig(kind="bksdm_kd", student_arch="bk-small", kd_steps=10)


def test_finetune_kd_and_cfg_aware_chain_distils_a_step_student_of_the_block_removed_model(tiny_teacher, tiny_curated,
                                                                                          tmp_path):
    """Through the run loop: the fine-tune keeps the teacher's architecture, the KD phase block-removes the fine-tuned
    UNet and trains its own step count and batch, and the CFG-aware phase learns from the KD's light UNet (its
    teacher and initial student); the exported student is that block-removed architecture."""
    from diffusers import UNet2DConditionModel

    from sd_distill.distill.run import distill

    params = tiny_params(tiny_teacher, method={"teacher_steps": 4, "student_steps": 2, "student_arch": "bk-small",
                                               "finetune_steps": 2, "finetune_batch_size": 4,
                                               "kd_steps": 3, "kd_batch_size": 3}, max_steps=2)
    out = distill(params, tiny_curated, tmp_path / "run")
    ft, kd, step = out["phases"]
    assert [p["phase"]["kind"] for p in out["phases"]] == ["finetune", "bksdm_kd", "cfg_aware"]
    assert (kd["steps"], kd["phase"]["batch_size"], step["steps"]) == (3, 3, 2)
    assert kd["phase"]["new_student"] and kd["student_init"] is None and kd["teacher_unet"].endswith("finetune-2")
    assert step["teacher_unet"] == step["student_init"] and step["teacher_unet"].endswith("bksdm-kd-bk-small-3")
    kd_log = (tmp_path / "run" / "phase-01-bksdm-kd-bk-small-3" / "loss_curve.csv").read_text().splitlines()[0]
    assert {"loss_task", "loss_kd_out", "loss_kd_feat"} <= set(kd_log.split(","))  # BK-SDM's three terms

    def unet(folder):
        return UNet2DConditionModel.from_pretrained(str(folder / "unet"))

    original, student = unet(tiny_teacher), unet(tmp_path / "run" / "student")
    tuned = unet(tmp_path / "run" / "phase-00-finetune-2")
    assert tuned.config.down_block_types == original.config.down_block_types
    assert student.config.layers_per_block == 1 and student.config.mid_block_type is None  # bk-small of the teacher
    assert json.loads((tmp_path / "run" / "phase-02-cfg-aware-4-2" / "phase.json").read_text())["phase"]["index"] == 2


def test_students_that_differ_only_after_the_finetune_share_its_stage(tiny_teacher):
    """The fine-tune phase is trained and keyed with only the settings it reads, so a BK student with KD and a data
    term reuses the same-architecture student's fine-tune; a different fine-tune recipe does not."""
    from sd_distill.distill.methods import phase_params
    from sd_distill.store import stage_key

    base = {"teacher_steps": 4, "student_steps": 2, "finetune_steps": 3, "finetune_lr": 1e-3}
    same = tiny_params(tiny_teacher, method=base)
    light = tiny_params(tiny_teacher, method={**base, "student_arch": "bk-small", "kd_steps": 2,
                                              "data_loss_weight": 0.5})
    other = tiny_params(tiny_teacher, method={**base, "finetune_lr": 3e-4})

    def finetune_key(params):
        phase = plan_phases(params.method)[0]
        assert phase.kind == "finetune"
        tuned = phase_params(params, phase)
        assert plan_phases(tuned.method)[0] == phase  # the reduced settings plan the same fine-tune phase
        return stage_key(f"distill/phase-{phase.name}", tuned, (), "1")

    assert finetune_key(same) == finetune_key(light) != finetune_key(other)
    kd = plan_phases(light.method)[1]
    assert phase_params(light, kd) is light  # every other phase keeps its student's own settings
