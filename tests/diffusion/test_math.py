"""The diffusion math module pinned to exact formulas and to diffusers' own DDIMScheduler."""

from __future__ import annotations

import math

import pytest
import torch

from sd_distill.diffusion.math import (add_noise, alphas_sigmas, cfg_combine, convert, ddim_endpoint_scale, ddim_step,
                                       guidance_embedding, snr_weight, to_eps, to_v, to_x0, two_step_target)
from sd_distill.distill.methods.common import regression_loss
from sd_distill.diffusion.schedule import NoiseSchedule
from sd_distill.tiny.sd import ddim_scheduler
from tests._fixtures_methods import PREDICTION_TYPES

TYPES = ("epsilon", "sample", "v_prediction")


def _state(seed=0, t=(10, 400, 990)):
    g = torch.Generator().manual_seed(seed)
    acp = ddim_scheduler().alphas_cumprod
    alpha, sigma = alphas_sigmas(acp, torch.tensor(t))
    x0 = torch.randn(len(t), 4, 8, 8, generator=g)
    eps = torch.randn(len(t), 4, 8, 8, generator=g)
    return x0, eps, alpha, sigma, add_noise(x0, eps, alpha, sigma)


def test_alphas_sigmas_are_sqrt_alphas_cumprod_and_use_final_alpha_past_the_end():
    acp = ddim_scheduler().alphas_cumprod
    a, s = alphas_sigmas(acp, torch.tensor([0, 999, -1]), final_alpha_cumprod=1.0)
    assert a.shape == (3, 1, 1, 1)
    assert a[0].item() == pytest.approx(math.sqrt(acp[0].item()))
    assert s[1].item() == pytest.approx(math.sqrt(1 - acp[999].item()))
    assert (a[2].item(), s[2].item()) == (1.0, 0.0)
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))


def test_every_prediction_type_of_the_true_pair_converts_to_the_same_x0_eps_v():
    x0, eps, alpha, sigma, z = _state()
    v = alpha * eps - sigma * x0
    truth = {"epsilon": eps, "sample": x0, "v_prediction": v}
    for src, pred in truth.items():
        assert torch.allclose(to_x0(pred, z, alpha, sigma, src), x0, atol=1e-4)
        assert torch.allclose(to_eps(pred, z, alpha, sigma, src), eps, atol=1e-3)
        assert torch.allclose(to_v(pred, z, alpha, sigma, src), v, atol=1e-4)


@pytest.mark.parametrize("src", TYPES + ("x0", "v"))
@pytest.mark.parametrize("dst", TYPES + ("x0", "v"))
def test_round_trip_between_any_two_types_is_identity(src, dst):
    _, _, alpha, sigma, z = _state(1)
    pred = torch.randn_like(z)
    back = convert(convert(pred, z, alpha, sigma, src, dst), z, alpha, sigma, dst, src)
    assert torch.allclose(back, pred, atol=1e-3, rtol=1e-4)


def test_unknown_prediction_type_lists_valid_ones():
    _, _, alpha, sigma, z = _state()
    with pytest.raises(ValueError, match="valid:.*epsilon.*sample.*v_prediction"):
        to_x0(z, z, alpha, sigma, "flow")
    with pytest.raises(ValueError, match="unknown prediction type / space 'noise'"):
        convert(z, z, alpha, sigma, "noise", "x0")


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers_ddim_scheduler_step(prediction_type, spacing):
    sched = ddim_scheduler(prediction_type)
    sched.register_to_config(timestep_spacing=spacing)
    sched.set_timesteps(8)
    ns = NoiseSchedule.from_scheduler(sched)
    assert torch.equal(ns.timesteps(8), sched.timesteps)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps.tolist():
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, z).prev_sample
        a, s = ns.alphas_sigmas(t)
        a_p, s_p = ns.alphas_sigmas(ns.prev_timestep(t, 8))
        mine = ddim_step(z, to_x0(out, z, a, s, prediction_type), to_eps(out, z, a, s, prediction_type), a_p, s_p)
        assert torch.allclose(mine, ref, atol=1e-5), (prediction_type, t)
        z = ref


@pytest.mark.parametrize("t_end", [250, -1])
def test_two_step_target_lands_on_the_teachers_latent_in_one_ddim_step(t_end):
    ns = NoiseSchedule.from_scheduler(ddim_scheduler())
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(3, 4, 8, 8, generator=g)
    t, t_mid = torch.tensor([750] * 3), torch.tensor([500] * 3)
    a_t, s_t = ns.alphas_sigmas(t)
    a_m, s_m = ns.alphas_sigmas(t_mid)
    a_e, s_e = ns.alphas_sigmas(torch.tensor([t_end] * 3))
    # two arbitrary "teacher" DDIM steps t -> t_mid -> t_end
    x1 = torch.randn_like(z_t)
    z_mid = ddim_step(z_t, x1, to_eps(x1, z_t, a_t, s_t, "sample"), a_m, s_m)
    x2 = torch.randn_like(z_t)
    z_end = ddim_step(z_mid, x2, to_eps(x2, z_mid, a_m, s_m, "sample"), a_e, s_e)
    target = two_step_target(z_t, z_end, a_t, s_t, a_e, s_e)
    one_step = ddim_step(z_t, target, to_eps(target, z_t, a_t, s_t, "sample"), a_e, s_e)
    assert torch.allclose(one_step, z_end, atol=1e-4)
    assert not torch.allclose(target, x2, atol=1e-2)  # it is not simply the last x0 estimate


def test_cfg_combine_is_diffusers_form_and_equals_imagen_with_w_minus_one():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    s = torch.tensor([1.0, 7.5])
    out = cfg_combine(c, u, s)
    assert torch.allclose(out[0], c[0])  # s = 1: no guidance
    w = 6.5
    assert torch.allclose(out[1], (1 + w) * c[1] - w * u[1], atol=1e-5)


def test_guidance_embedding_equals_stock_pipeline_helper():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([0.0, 1.0, 6.5])
    for dim in (32, 33, 256):
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.allclose(guidance_embedding(w, dim), ref, atol=1e-6)


def test_snr_weights_are_the_documented_x0_weights_rescaled_per_space():
    a, s = torch.tensor([0.6]), torch.tensor([0.8])  # SNR = 0.5625
    r = 0.36 / 0.64
    assert snr_weight(a, s, "none", "epsilon").item() == 1.0
    assert snr_weight(a, s, "snr", "x0").item() == pytest.approx(r)
    assert snr_weight(a, s, "snr", "epsilon").item() == pytest.approx(1.0)  # the plain epsilon loss
    assert snr_weight(a, s, "truncated_snr", "x0").item() == pytest.approx(1.0)  # max(SNR, 1)
    assert snr_weight(a, s, "truncated_snr", "v").item() == pytest.approx(1.0 / (r + 1))
    a2, s2 = torch.tensor([0.99]), torch.tensor([math.sqrt(1 - 0.99**2)])  # SNR ~ 49
    assert snr_weight(a2, s2, "min_snr_5", "x0").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="valid:.*min_snr_5"):
        snr_weight(a, s, "p2", "x0")


def test_weighted_errors_agree_across_loss_spaces():
    """The same x0 error, measured in x0 / epsilon / v space with its scheme weight, gives the same number."""
    x0, _, alpha, sigma, z = _state(3)
    x_hat = x0 + 0.1 * torch.randn_like(x0)
    for scheme in ("snr", "truncated_snr", "min_snr_5"):
        vals = []
        for space in ("x0", "epsilon", "v"):
            err = (convert(x_hat, z, alpha, sigma, "sample", space) - convert(x0, z, alpha, sigma, "sample", space))
            vals.append(snr_weight(alpha, sigma, scheme, space).reshape(-1) * err.pow(2).flatten(1).mean(1))
        assert torch.allclose(vals[0], vals[1], rtol=1e-3) and torch.allclose(vals[0], vals[2], rtol=1e-3)


def test_endpoint_loss_is_the_mse_between_where_the_two_ddim_steps_land():
    """loss_space 'endpoint': the student's x0 error is measured where its one DDIM step t -> t_end lands, i.e. the
    MSE between z_t_end(student) and z_t_end(teacher target); high-noise steps, which barely move the endpoint per
    unit of x0 error, weigh correspondingly little."""
    x0, _, alpha, sigma, z = _state(4, t=(999, 500, 124))
    acp = ddim_scheduler().alphas_cumprod
    a_e, s_e = alphas_sigmas(acp, torch.tensor([874, 374, -1]), final_alpha_cumprod=float(acp[0]))
    x_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))

    def land(x):
        return ddim_step(z, x, to_eps(x, z, alpha, sigma, "sample"), a_e, s_e)

    expected = (land(x_hat) - land(x0)).pow(2).flatten(1).mean(1).mean()
    got = regression_loss(x_hat, x0, z, alpha, sigma, "endpoint", "none", end=(a_e, s_e))
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)
    scale = ddim_endpoint_scale(alpha, sigma, a_e, s_e).reshape(-1)
    assert scale[0] < 0.1 < 0.5 < scale[2]  # the first of 8 trailing steps vs the last one
    with pytest.raises(ValueError, match="end"):
        regression_loss(x_hat, x0, z, alpha, sigma, "endpoint", "none")
    with pytest.raises(ValueError, match="snr_weighting 'none'"):
        snr_weight(alpha, sigma, "min_snr_5", "endpoint")
