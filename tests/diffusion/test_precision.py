"""Schedule math stays fp32 under a bf16 UNet: the guidance scale, the CFG combination and the DDIM update of a
bf16-autocast (or bf16-weight) teacher equal an fp64 computation on the same UNet outputs, to fp32 rounding.

The UNet outputs themselves are bf16 (that rounding is the UNet's, and both sides share it); what must not be
bf16 is everything after: a bf16-rounded alpha_t / sigma_t biases every teacher sub-step the same way.
"""

from __future__ import annotations

import pytest
import torch

from sd_distill.diffusion.math import to_eps, to_x0
from sd_distill.diffusion.sampling import ddim_sample, guided_prediction
from sd_distill.diffusion.schedule import NoiseSchedule
from sd_distill.distill.methods.common import teacher_endpoint
from sd_distill.tiny.sd import ddim_scheduler, tiny_unet

GUIDANCE = torch.tensor([7.3, 3.1])  # bf16 rounds 7.3 to 7.3125 and 3.1 to 3.09375


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    return z, cond, uncond


def _outputs_bf16(unet, z, t, cond, uncond, autocast: bool):
    """The UNet's own (uncond, cond) outputs as the guided call computes them: one batched forward."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dtype = next(unet.parameters()).dtype
        zz = torch.cat([z, z]).to(dtype)
        text = torch.cat([uncond.expand(2, -1, -1), cond]).to(dtype)
        out = unet(zz, torch.cat([t, t]), encoder_hidden_states=text).sample
    assert out.dtype == torch.bfloat16
    return out.double().chunk(2)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-weights"])
def test_cfg_combination_and_guidance_scale_are_fp32(autocast):
    unet = tiny_unet(block_out_channels=(16, 32), seed=1).eval()
    if not autocast:
        unet = unet.to(torch.bfloat16)
    z, cond, uncond = _inputs()
    t = torch.tensor([999, 999])
    u, c = _outputs_bf16(unet, z, t, cond, uncond, autocast)
    expected = u + GUIDANCE.double().reshape(-1, 1, 1, 1) * (c - u)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = guided_prediction(unet, z, t, cond, uncond, GUIDANCE, "cfg")
    assert got.dtype == torch.float32
    err = (got.double() - expected).abs().max().item()
    assert err < 1e-5 * expected.abs().max().item(), f"CFG combine off by {err:.3g} (bf16 rounding of s or outputs)"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bf16_teacher_endpoint_uses_the_fp32_schedule(prediction_type):
    """One teacher DDIM step on the first trailing interval (999 -> 874) with CFG, under bf16 autocast."""
    unet = tiny_unet(block_out_channels=(16, 32), seed=2).eval()
    schedule = NoiseSchedule.from_scheduler(ddim_scheduler(prediction_type)).with_spacing("trailing")
    z, cond, uncond = _inputs(3)
    t, t_end = torch.tensor([999, 999]), torch.tensor([874, 874])
    u, c = _outputs_bf16(unet, z, t, cond, uncond, autocast=True)
    pred = u + GUIDANCE.double().reshape(-1, 1, 1, 1) * (c - u)
    acp = schedule.alphas_cumprod.double()
    a, s = acp[999].sqrt(), (1 - acp[999]).sqrt()
    a_e, s_e = acp[874].sqrt(), (1 - acp[874]).sqrt()
    zd = z.double()
    expected = a_e * to_x0(pred, zd, a, s, prediction_type) + s_e * to_eps(pred, zd, a, s, prediction_type)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = teacher_endpoint(unet, schedule, z, t, t_end, 1, cond, uncond, GUIDANCE, "cfg", prediction_type)
    assert got.dtype == torch.float32
    err = (got.double() - expected).abs().max().item()
    assert err < 1e-5, f"bf16 teacher step off the fp64 computation by {err:.3g}"


def test_bf16_ddim_sample_returns_fp32_latents_close_to_fp32_sampling():
    """A bf16-weight UNet samples (inputs cast to its dtype) and the latents stay fp32; the gap to the fp32 UNet's
    sample is bf16 output rounding only (small), not a schedule bias."""
    unet = tiny_unet(block_out_channels=(16, 32), seed=4).eval()
    z, cond, uncond = _inputs(5)
    sched = ddim_scheduler()
    ref = ddim_sample(unet, sched, z, cond, uncond, 4, 7.5, "epsilon")
    low = ddim_sample(unet.to(torch.bfloat16), sched, z, cond, uncond, 4, 7.5, "epsilon")
    assert low.dtype == torch.float32
    assert (low - ref).abs().max().item() < 0.05 * ref.abs().max().item()
