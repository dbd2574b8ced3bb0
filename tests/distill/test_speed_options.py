"""The trainer's speed options change how a step is computed, not what it trains.

On the tiny teacher on the CPU, each option's short run keeps the default run's loss sequence (channels_last,
torch.compile regional / full through the ``aot_eager`` backend, the fused AdamW), and the lazy NaN guard
(``nan_check_every`` > 1: the verdict stays on the device, a bad step is skipped inside the fused AdamW) gives the
eager guard's history, weights, EMA and errors exactly; frozen modules sit in the autocast dtype; a lazy step
reads nothing back to the host; the CFG-aware teacher's two trajectories share one forward per sub-step.
"""

from __future__ import annotations

import csv
import sys

import pytest
import torch
from safetensors.torch import load_file

from sd_distill.distill.config import TrainerConfig
from sd_distill.distill.hooks.nan_guard import TrainingDivergedError
from sd_distill.distill.methods import plan_phases
from sd_distill.distill.speed import compile_unet
from sd_distill.distill.trainer import train_phase
from tests._fixtures_distill import poison_loss, tiny_params

# Loss sequences of two numerically different but equivalent step implementations (memory layout, traced graphs,
# fused kernels) agree to float32 round-off accumulated over a few optimizer steps.
LOSS_RTOL = 1e-4
UPDATE_RTOL = 2e-2  # relative distance of the trained weights' updates (see _update_gap)


def _run(teacher, cache, out, method=None, **trainer) -> dict:
    """One short phase; its per-step history, exported UNet and last raw (non-EMA) student weights."""
    params = tiny_params(teacher, method, **trainer)
    summary = train_phase(params, plan_phases(params.method)[0], cache, out)
    with open(out / "loss_curve.csv") as f:
        history = list(csv.DictReader(f))
    return {"summary": summary, "history": history, "loss": [float(r["loss"]) for r in history],
            "unet": load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")),
            "raw": load_file(str(next((out / "checkpoints").glob(f"step-{summary['steps']:07d}")) / "student.safetensors"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _update_gap(run: dict, ref: dict, teacher) -> float:
    """|w_run - w_ref| / |w_ref - w_0| over all trained weights (w_0: the initialisation, a copy of the teacher).

    Weights are compared through their updates: Adam moves every weight by about lr per step whatever its gradient,
    so a weight whose gradient is round-off in both runs may step either way and an elementwise tolerance means
    nothing; the relative distance of the whole update does."""
    init = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    gap = sum(float((run["unet"][k] - ref["unet"][k]).pow(2).sum()) for k in ref["unet"])
    update = sum(float((ref["unet"][k] - init[k]).pow(2).sum()) for k in ref["unet"])
    return (gap / update) ** 0.5


@pytest.fixture(scope="module")
def default_run(tiny_teacher, tiny_cache, tmp_path_factory):
    return _run(tiny_teacher, tiny_cache, tmp_path_factory.mktemp("default") / "p", max_steps=3)


@pytest.mark.parametrize("option", [{"channels_last": True}, {"fused_adamw": True}], ids=["channels_last", "fused_adamw"])
def test_layout_and_optimizer_options_keep_the_loss_sequence(option, default_run, tiny_teacher, tiny_cache, tmp_path):
    run = _run(tiny_teacher, tiny_cache, tmp_path / "p", max_steps=3, **option)
    assert run["loss"] == pytest.approx(default_run["loss"], rel=LOSS_RTOL)
    assert _update_gap(run, default_run, tiny_teacher) < UPDATE_RTOL


# compile time dominates on 2 cores: one batch shape per UNet (no trajectory states, whose row count varies, and
# no vanilla target, whose shared teacher forward has 3B rows), so each UNet compiles once; 2 steps
FIXED_SHAPES = {"kind": "cfg_aware", "teacher_steps": 4, "student_steps": 2, "trajectory_fraction": 0.0,
                "vanilla_loss_weight": 0.0}  # every teacher forward has 2B rows


@pytest.fixture(scope="module")
def eager_fixed_shapes_run(tiny_teacher, tiny_cache, tmp_path_factory):
    return _run(tiny_teacher, tiny_cache, tmp_path_factory.mktemp("eager") / "p", FIXED_SHAPES, max_steps=2)


@pytest.mark.parametrize("how", ["regional", "full"])
def test_compiled_unets_keep_the_loss_sequence(how, eager_fixed_shapes_run, tiny_teacher, tiny_cache, tmp_path):
    torch._dynamo.reset()
    run = _run(tiny_teacher, tiny_cache, tmp_path / "p", FIXED_SHAPES, max_steps=2, compile_unets=how,
               compile_backend="aot_eager")
    ref = eager_fixed_shapes_run
    assert run["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)
    assert set(run["unet"]) == set(ref["unet"])  # compiled in place: parameter names unchanged
    assert _update_gap(run, ref, tiny_teacher) < UPDATE_RTOL


def test_compile_unet_compiles_the_repeated_blocks_or_the_whole_model_and_names_bad_choices(tiny_teacher):
    from sd_distill.distill.trainer import load_unet

    unet = load_unet(tiny_teacher)
    blocks = sum(type(m).__name__ in ("BasicTransformerBlock", "ResnetBlock2D") for m in unet.modules())
    assert compile_unet(unet, "off") == 0
    assert compile_unet(unet, "regional", backend="aot_eager") == blocks > 0
    with pytest.raises(ValueError, match=r"compile_unets 'whole' is not one of \['off', 'full', 'regional'\]"):
        compile_unet(unet, "whole")
    with pytest.raises(ValueError, match="compile_backend 'tensorrt-ish' is not a torch.compile backend; valid:"):
        compile_unet(unet, "full", backend="tensorrt-ish")


# --- the lazy NaN guard: the eager guard's results, read every nan_check_every steps -------------------------
LAZY = dict(fused_adamw=True, ema_decay=0.8, log_every=8, checkpoint_every=4)


def test_lazy_nan_guard_gives_the_same_history_weights_and_ema(tiny_teacher, tiny_cache, tmp_path):
    eager = _run(tiny_teacher, tiny_cache, tmp_path / "eager", max_steps=8, nan_check_every=1, **LAZY)
    lazy = _run(tiny_teacher, tiny_cache, tmp_path / "lazy", max_steps=8, nan_check_every=4, **LAZY)
    assert lazy["history"] == eager["history"]  # every column, as written to loss_curve.csv
    assert _same(lazy["raw"], eager["raw"]) and _same(lazy["unet"], eager["unet"])  # EMA
    assert lazy["summary"]["final_loss"] == eager["summary"]["final_loss"]


def test_lazy_nan_guard_skips_a_bad_step_on_the_device_like_the_eager_guard(tiny_teacher, tiny_cache, tmp_path,
                                                                            monkeypatch):
    poison_loss(monkeypatch, {2})
    runs = [_run(tiny_teacher, tiny_cache, tmp_path / str(n), max_steps=4, nan_check_every=n, nan_patience=1, **LAZY)
            for n in (1, 4)]
    assert [r["skipped"] for r in runs[1]["history"]] == ["False", "True", "False", "False"]
    assert runs[1]["history"] == runs[0]["history"]
    assert _same(runs[1]["raw"], runs[0]["raw"]) and _same(runs[1]["unet"], runs[0]["unet"])


@pytest.mark.parametrize("fault, bad_step, factor, expected", [
    ("nan", 3, float("nan"), "diverged at step 3: loss is nan"),
    ("explode", 12, 1e6, "diverged at step 12: loss .* exceeds 100 x running mean"),
])
def test_lazy_nan_guard_raises_at_the_same_step_with_the_same_message(fault, bad_step, factor, expected, tiny_teacher,
                                                                     tiny_cache, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {bad_step}, factor=factor)
    errors = []
    for n in (1, 4):
        with pytest.raises(TrainingDivergedError, match=expected) as err:
            _run(tiny_teacher, tiny_cache, tmp_path / str(n), max_steps=bad_step + 2, nan_check_every=n, **LAZY)
        errors.append(err.value)
    assert str(errors[1]).replace(str(tmp_path / "4"), "") == str(errors[0]).replace(str(tmp_path / "1"), "")
    last_good = (bad_step - 1) // 4 * 4  # checkpoint_every 4
    assert [e.last_checkpoint.name if e.last_checkpoint else None for e in errors] == \
        [f"step-{last_good:07d}" if last_good else None] * 2


def test_speed_fields_are_validated():
    TrainerConfig(nan_check_every=10, mixed_precision="bf16")  # fused AdamW chosen by default
    with pytest.raises(ValueError, match="nan_check_every > 1 is for mixed_precision 'no' / 'bf16'"):
        TrainerConfig(nan_check_every=10, mixed_precision="fp16")
    with pytest.raises(ValueError, match="nan_check_every > 1 skips bad steps inside the fused AdamW"):
        TrainerConfig(nan_check_every=10, fused_adamw=False)
    with pytest.raises(ValueError, match="compile_unets"):
        TrainerConfig(compile_unets="whole")
    with pytest.raises(ValueError, match="nan_check_every"):
        TrainerConfig(nan_check_every=0)


# --- what a lazy step does not do -----------------------------------------------------------------------------
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")


def _count_host_reads(monkeypatch) -> dict:
    """Count every Python-level read of a tensor's value, except the data order's: ``micro_batch_indices`` draws
    it on the host from its own CPU generator, so its reads never wait on the device."""
    counts = dict.fromkeys(HOST_READS, 0)
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_name != "micro_batch_indices":
                counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_a_lazy_step_reads_nothing_back_to_the_host(tiny_teacher, tiny_cache, tmp_path, monkeypatch):
    # the host reads of a whole run (setup, one guard read, checkpoint, export) do not grow with its steps
    method = {"kind": "cfg_aware", "teacher_steps": 4, "student_steps": 2, "trajectory_fraction": 0.0}
    reads = []
    for steps in (2, 5):
        with monkeypatch.context() as m:
            counts = _count_host_reads(m)
            _run(tiny_teacher, tiny_cache, tmp_path / str(steps), method, max_steps=steps, nan_check_every=steps,
                 log_every=steps, checkpoint_every=steps, fused_adamw=True)
        reads.append(dict(counts))
    assert reads[0] == reads[1]


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision setting per process; a bf16 run needs it cleared before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_frozen_teacher_is_held_in_the_autocast_dtype_only(tiny_teacher, tiny_cache, tmp_path, monkeypatch,
                                                           fresh_accelerator_state):
    import sd_distill.distill.methods as methods

    built = []
    real = methods.build_method
    monkeypatch.setattr(methods, "build_method", lambda *args: built.append(real(*args)) or built[-1])
    _run(tiny_teacher, tiny_cache, tmp_path / "p", max_steps=1, mixed_precision="bf16", nan_check_every=2)
    method = built[0]
    frozen = list(method.teacher_unet.parameters()) + list(method.teacher_unet.buffers())
    assert {p.dtype for p in frozen if p.is_floating_point()} == {torch.bfloat16}
    assert not any(p.requires_grad or p.grad is not None for p in method.teacher_unet.parameters())
    assert {p.dtype for p in method.student.parameters()} == {torch.float32}  # the trained weights stay fp32


def test_cfg_aware_teacher_runs_both_trajectories_in_one_forward_per_sub_step(tiny_teacher):
    from sd_distill.diffusion.schedule import NoiseSchedule
    from sd_distill.distill.methods.common import teacher_cfg_and_cond_endpoints, teacher_endpoint
    from sd_distill.distill.trainer import load_unet
    from diffusers import DDIMScheduler

    unet = load_unet(tiny_teacher).eval()
    schedule = NoiseSchedule.from_scheduler(DDIMScheduler.from_pretrained(str(tiny_teacher), subfolder="scheduler"))
    g = torch.Generator().manual_seed(0)
    n, dim = 3, unet.config.cross_attention_dim
    z_t = torch.randn(n, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(n, 7, dim, generator=g), torch.randn(1, 7, dim, generator=g)
    t, t_end = torch.tensor([999, 500, 250]), torch.tensor([499, 0, -1])
    s = torch.tensor([2.0, 5.0, 7.5])
    rows = []
    handle = unet.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    cfg_end, cond_end = teacher_cfg_and_cond_endpoints(unet, schedule, z_t, t, t_end, 3, cond, uncond, s, "epsilon")
    assert rows == [2 * n, 3 * n, 3 * n]  # (3k - 1) n rows in k forwards
    rows.clear()
    ref_cfg = teacher_endpoint(unet, schedule, z_t, t, t_end, 3, cond, uncond, s, "cfg", "epsilon")
    ref_cond = teacher_endpoint(unet, schedule, z_t, t, t_end, 3, cond, None, 1.0, "cond", "epsilon")
    handle.remove()
    assert rows == [2 * n] * 3 + [n] * 3  # 3k n rows in 2k forwards
    assert torch.allclose(cfg_end, ref_cfg, atol=1e-5) and torch.allclose(cond_end, ref_cond, atol=1e-5)
