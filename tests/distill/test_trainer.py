"""train_phase on the tiny teacher: outputs, exact resume, NaN guard, EMA, LR schedule, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sd_distill.distill.hooks.ema import EMA
from sd_distill.distill.hooks.nan_guard import NanGuard, TrainingDivergedError, skip_update
from sd_distill.distill.methods import plan_phases
from sd_distill.distill.trainer import lr_multiplier, train_phase
from tests._fixtures_distill import poison_loss, tiny_params


def _phase(params):
    return plan_phases(params.method)[0]


def _unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_short_run_trains_the_student_and_reports_progress(tiny_teacher, tiny_cache, tmp_path, capsys):
    params = tiny_params(tiny_teacher, max_steps=4)
    calls = []
    out = train_phase(params, _phase(params), tiny_cache, tmp_path / "p", progress=lambda d, t, m: calls.append((d, t)))
    assert out["steps"] == 4 and out["skipped_steps"] == 0 and out["prediction_type"] == "epsilon"
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert all(e["event"] == "progress" and e["max_steps"] == 4 and e["samples_per_s"] > 0 for e in events)
    curve = (tmp_path / "p" / "loss_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss,lr") and len(curve) == 5 and "loss_cfg" in curve[0]
    assert json.loads((tmp_path / "p" / "phase.json").read_text())["final_loss"] == pytest.approx(events[-1]["loss"])
    # the saved student differs from its initialisation (a copy of the teacher UNet)
    teacher = load_file(str(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    student = _unet_weights(tmp_path / "p")
    assert set(student) == set(teacher)
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)
    assert sorted(p.name for p in (tmp_path / "p" / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


class Interrupt(Exception):
    pass


def _interrupt_at(step):
    def progress(done, total, message):
        if done == step:
            raise Interrupt(f"killed at step {step}")
    return progress


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_teacher, tiny_cache, tmp_path):
    # accumulation, posterior sampling and EMA make every piece of resumable state matter
    params = tiny_params(tiny_teacher, max_steps=6, checkpoint_every=2, grad_accum=2, ema_decay=0.8,
                         lr_schedule="cosine", warmup_steps=2)
    params.data.sample_posterior = True
    phase = _phase(params)
    full = train_phase(params, phase, tiny_cache, tmp_path / "full")
    with pytest.raises(Interrupt):  # dies after step 5; the newest checkpoint is step 4
        train_phase(params, phase, tiny_cache, tmp_path / "cut", progress=_interrupt_at(5))
    assert not (tmp_path / "cut" / "unet").exists()
    resumed = train_phase(params, phase, tiny_cache, tmp_path / "cut", resume=True)
    assert resumed["resumed_from"].endswith("step-0000004") and resumed["steps_this_run"] == 2
    a, b = _unet_weights(tmp_path / "full"), _unet_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw_a = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000006" / "student.safetensors"))
    raw_b = load_file(str(tmp_path / "cut" / "checkpoints" / "step-0000006" / "student.safetensors"))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)
    assert (tmp_path / "full" / "loss_curve.csv").read_text() == (tmp_path / "cut" / "loss_curve.csv").read_text()
    assert full["final_loss"] == resumed["final_loss"]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_teacher, tiny_cache, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {5})
    params = tiny_params(tiny_teacher, max_steps=6, checkpoint_every=2)
    with pytest.raises(TrainingDivergedError, match="diverged at step 5: loss is nan.*step-0000004") as err:
        train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    assert err.value.last_checkpoint.name == "step-0000004"
    assert (err.value.last_checkpoint / "student.safetensors").exists()
    assert not (tmp_path / "p" / "unet").exists()


def test_nan_patience_skips_a_bad_step_without_touching_the_weights(tiny_teacher, tiny_cache, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {2})
    params = tiny_params(tiny_teacher, max_steps=3, nan_patience=1)
    out = train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    assert out["steps"] == 3 and out["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in _unet_weights(tmp_path / "p").values())


def test_exploding_loss_is_bad_after_warmup_and_nan_guard_is_patient():
    guard = NanGuard(patience=1, explode_factor=10.0, warmup=3)
    for step in range(1, 4):
        assert guard.check(step, 1.0, 0.5, None)
    assert guard.reason_step_is_bad(5.0) is None
    assert "exceeds 10 x running mean" in guard.reason_step_is_bad(11.0)
    assert guard.check(4, 50.0, 0.5, None) is False  # first bad step: skipped
    with pytest.raises(TrainingDivergedError, match="2 bad step"):
        guard.check(5, float("inf"), 0.5, None)


def _fp16_style_step(model, opt, scaler, guard, step, loss_scale=1.0, poison=False):
    """The trainer's step order with a GradScaler: scaled backward, unscale (clipping), guard, step or skip."""
    loss = model(torch.ones(1, 2)).sum() * loss_scale
    if poison:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    good = guard.check(step, float(loss.detach()), None, None)
    if good:
        scaler.step(opt)
        scaler.update()
    else:
        skip_update(scaler)
    opt.zero_grad(set_to_none=True)
    return good


def test_fp16_grad_scaler_survives_a_step_the_nan_guard_rejects():
    """A rejected step skips optimizer.step() (which is what calls scaler.update()); without skip_update the next
    step's unscale_ raises "unscale_() has already been called". With it, training goes on, the scale backs off
    after the inf gradients, and the rejected step leaves the weights alone."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = NanGuard(patience=2)
    assert _fp16_style_step(model, opt, scaler, guard, 1)
    before = [p.detach().clone() for p in model.parameters()]
    assert not _fp16_style_step(model, opt, scaler, guard, 2, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 512.0  # backoff_factor 0.5 after the inf gradients
    assert _fp16_style_step(model, opt, scaler, guard, 3)  # unscale_ works again
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    broken = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.zero_grad()
    (broken.scale(model(torch.ones(1, 2)).sum()) * float("inf")).backward()
    broken.unscale_(opt)  # ... the guard rejects, nothing updates the scaler ...
    opt.zero_grad()
    broken.scale(model(torch.ones(1, 2)).sum()).backward()
    with pytest.raises(RuntimeError, match="unscale_\(\) has already been called"):
        broken.unscale_(opt)


def test_ema_follows_the_warmed_up_decay_and_is_exported(tiny_teacher, tiny_cache, tmp_path):
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema = EMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # d = min(0.9, 1/10) = 0.1 -> 0.1*0 + 0.9*1
    ema.update(lin)  # d = min(0.9, 2/11)      -> 0.9 + (1 - 0.9) * (1 - 2/11)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 0.9 + 0.1 * (1 - 2 / 11)))

    params = tiny_params(tiny_teacher, max_steps=3, ema_decay=0.5, checkpoint_every=3)
    train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    ckpt = tmp_path / "p" / "checkpoints" / "step-0000003"
    shadow = torch.load(ckpt / "ema.pt", weights_only=True)["shadow"]
    exported, raw = _unet_weights(tmp_path / "p"), load_file(str(ckpt / "student.safetensors"))
    name = "conv_in.weight"
    assert torch.equal(exported[name], shadow[name]) and not torch.equal(exported[name], raw[name])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from sd_distill.distill.config import TrainerConfig

    cfg = TrainerConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_multiplier(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, cfg) == pytest.approx(1.0) and lr_multiplier(10, cfg) == pytest.approx(0.1)
    assert lr_multiplier(6, cfg) == pytest.approx(0.55)
    lin = TrainerConfig(max_steps=10, lr_schedule="linear", min_lr_ratio=0.0)
    assert lr_multiplier(5, lin) == pytest.approx(0.5)


def test_bad_input_fails_before_training(tiny_teacher, tiny_cache, tmp_path):
    import shutil

    from pydantic import ValidationError

    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, broken)
    shutil.rmtree(broken / "vae")
    params = tiny_params(broken)
    with pytest.raises(FileNotFoundError, match="missing component.*vae"):
        train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    with pytest.raises(ValueError, match="fp16.*needs a GPU"):
        fp16 = tiny_params(tiny_teacher, mixed_precision="fp16")
        train_phase(fp16, _phase(fp16), tiny_cache, tmp_path / "q")
    with pytest.raises(ValidationError, match="mixed_precision"):
        tiny_params(tiny_teacher, mixed_precision="fp8")
    with pytest.raises(FileNotFoundError, match="not a latent cache"):
        train_phase(tiny_params(tiny_teacher), _phase(params), tmp_path / "nocache", tmp_path / "r")


def test_resume_refuses_a_checkpoint_of_other_parameters_and_a_fresh_start_discards_old_ones(tiny_teacher, tiny_cache, tmp_path):
    params = tiny_params(tiny_teacher, max_steps=2, checkpoint_every=1)
    train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    other = tiny_params(tiny_teacher, max_steps=2, lr=5e-4)
    with pytest.raises(ValueError, match="cannot resume.*trainer.lr"):
        train_phase(other, _phase(other), tiny_cache, tmp_path / "p", resume=True)
    longer = tiny_params(tiny_teacher, max_steps=3, checkpoint_every=1)  # more steps may be added on resume
    assert train_phase(longer, _phase(longer), tiny_cache, tmp_path / "p", resume=True)["steps_this_run"] == 1
    fresh = tiny_params(tiny_teacher, max_steps=1, checkpoint_every=1)
    train_phase(fresh, _phase(fresh), tiny_cache, tmp_path / "p", resume=False)
    assert sorted(p.name for p in (tmp_path / "p" / "checkpoints").iterdir()) == ["step-0000001"]


def test_pixel_cache_is_vae_encoded_during_training_like_the_latent_cache(tiny_teacher, tiny_curated, tiny_cache, tmp_path):
    from sd_distill.distill.data import build_latent_cache

    build_latent_cache(str(tiny_teacher), tiny_curated, tmp_path / "pixels", resolution=32, dtype="float32",
                       cache_latents=False, device="cpu")
    params = tiny_params(tiny_teacher, max_steps=2)
    a = train_phase(params, _phase(params), tiny_cache, tmp_path / "a")
    b = train_phase(params, _phase(params), tmp_path / "pixels", tmp_path / "b")
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)


def test_block_removed_student_trains_with_feature_kd_and_is_saved_smaller(tiny_teacher, tiny_cache, tmp_path):
    params = tiny_params(tiny_teacher, method={"kind": "bksdm_kd", "student_arch": "bk-small", "student_steps": 2},
                         max_steps=2)
    out = train_phase(params, _phase(params), tiny_cache, tmp_path / "p")
    header = (tmp_path / "p" / "loss_curve.csv").read_text().splitlines()[0]
    assert out["steps"] == 2 and "loss_kd_feat" in header and "loss_kd_out" in header
    student = sum(v.numel() for v in _unet_weights(tmp_path / "p").values())
    teacher = sum(v.numel() for v in load_file(str(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")).values())
    assert student < teacher
