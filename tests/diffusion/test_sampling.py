"""The DDIM sampler and the guidance convention against a stock diffusers StableDiffusionPipeline."""

from __future__ import annotations

import pytest
import torch

from sd_distill.diffusion.math import guidance_embedding
from sd_distill.diffusion.sampling import ddim_sample, guided_prediction
from tests._fixtures_methods import PROMPTS


def _stock_pipeline(teacher):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer,
                                   unet=teacher.unet, scheduler=teacher.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddim_sample_with_cfg_matches_stock_pipeline_latents(load_tiny_teacher, prediction_type):
    from sd_distill.distill.teacher import encode_prompts

    teacher = load_tiny_teacher(prediction_type)
    pipe = _stock_pipeline(teacher)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=7.5, latents=z.clone(), output_type="latent").images
    mine = ddim_sample(teacher.unet, teacher.scheduler, z, encode_prompts(teacher, PROMPTS[:1]),
                       encode_prompts(teacher, [""]), 4, 7.5, prediction_type)
    assert torch.allclose(mine, ref, atol=1e-4)
    unguided = ddim_sample(teacher.unet, teacher.scheduler, z, encode_prompts(teacher, PROMPTS[:1]),
                           encode_prompts(teacher, [""]), 4, 1.0, prediction_type)
    assert not torch.allclose(unguided, ref, atol=1e-3)  # guidance changes the result


def test_stock_pipeline_feeds_a_w_conditioned_unet_the_embedding_of_guidance_scale_minus_one(load_tiny_teacher):
    from sd_distill.distill.teacher import encode_prompts
    from sd_distill.distill.methods import with_w_conditioning

    teacher = load_tiny_teacher("epsilon")
    unet = with_w_conditioning(teacher.unet, 16)
    seen = []
    original_forward = unet.forward

    def recording_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append((sample.shape[0], kwargs.get("timestep_cond")))
        return original_forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    unet.forward = recording_forward
    pipe = _stock_pipeline(teacher)
    pipe.unet = unet
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=7.5, latents=z.clone(), output_type="latent").images
    batch, cond = seen[0]
    assert batch == 1  # no CFG batch doubling for a w-conditioned UNet
    assert torch.allclose(cond, guidance_embedding(torch.tensor([6.5]), 16), atol=1e-6)
    unet.forward = original_forward
    mine = ddim_sample(unet, teacher.scheduler, z, encode_prompts(teacher, PROMPTS[:1]), None, 2, 7.5, "epsilon",
                       w_conditioned=True)
    assert torch.allclose(mine, ref, atol=1e-4)


def test_zero_initialised_w_input_leaves_the_unet_output_unchanged(load_tiny_teacher):
    from sd_distill.distill.methods import with_w_conditioning

    teacher = load_tiny_teacher("epsilon")
    unet = with_w_conditioning(teacher.unet, 16)
    assert unet.config.time_cond_proj_dim == 16
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    c = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500, 20])
    with torch.no_grad():
        a = guided_prediction(unet, z, t, c, None, torch.tensor([3.0, 9.0]), "wcond")
        b = guided_prediction(teacher.unet, z, t, c, None, 1.0, "cond")
    assert torch.allclose(a, b, atol=1e-5)


def test_guided_prediction_rejects_bad_modes_and_missing_inputs(load_tiny_teacher):
    teacher = load_tiny_teacher("epsilon")
    z, c = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="valid:.*cfg.*cond.*wcond"):
        guided_prediction(teacher.unet, z, 10, c, None, 2.0, "imagen")
    with pytest.raises(ValueError, match="negative"):
        guided_prediction(teacher.unet, z, 10, c, None, 2.0, "cfg")
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        guided_prediction(teacher.unet, z, 10, c, None, 2.0, "wcond")


def test_ddim_sample_refuses_guidance_without_negative_embeds(load_tiny_teacher):
    """guidance > 1 with no unconditional branch used to sample unguided without a word; it is an error now,
    while guidance 1 (unguided) and a w-conditioned UNet (guidance through its embedding) need no negatives."""
    from sd_distill.distill.teacher import encode_prompts

    teacher = load_tiny_teacher("epsilon")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(teacher, PROMPTS[:1])
    with pytest.raises(ValueError, match="needs negative_embeds"):
        ddim_sample(teacher.unet, teacher.scheduler, z, cond, None, 2, 7.5, "epsilon")
    unguided = ddim_sample(teacher.unet, teacher.scheduler, z, cond, None, 2, 1.0, "epsilon")
    assert unguided.shape == z.shape and torch.isfinite(unguided).all()
