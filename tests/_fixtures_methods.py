"""Shared fixtures for the diffusion-math and distillation-method tests: tiny teachers in every prediction type,
saved as real diffusers pipeline folders and loaded back through ``load_teacher``; a tiny training loop; the
N-step / 2N-step comparison the distillation tests assert on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
WORDS = ["cat", "dog", "red", "blue"]
PROMPTS = ["a red cat", "a blue dog"]

_FOLDERS: dict[str, Path] = {}
_TEACHERS: dict[str, object] = {}
_BASE: dict[str, object] = {}


@pytest.fixture(autouse=True)
def single_thread():
    """Two shared cores: one intra-op thread avoids oversubscription (10x slower otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrain_unet(unet, prediction_type: str, cond, uncond, steps: int = 120, lr: float = 2e-3, seed: int = 0):
    """A short denoising pre-training of the tiny teacher UNet on a fixed batch (SD's objective for its prediction
    type, every other sample on the empty prompt), so its sampler has real structure -- a systematic N-vs-2N-step
    gap -- instead of a random-weight teacher's noise amplification."""
    from sd_distill.diffusion.math import add_noise, alphas_sigmas, convert
    from sd_distill.tiny.sd import ddim_scheduler

    acp = ddim_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x0 = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    text = torch.cat([cond, uncond.expand(cond.shape[0], *cond.shape[1:])])  # tensors and TextCond alike
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    unet.train()
    for _ in range(steps):
        t = torch.randint(0, 1000, (4,), generator=g)
        a, s = alphas_sigmas(acp, t)
        eps = torch.randn(x0.shape, generator=g)
        z = add_noise(x0, eps, a, s)
        target = convert(eps, z, a, s, "epsilon", prediction_type)
        loss = (unet(z, t, encoder_hidden_states=text).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()
    return unet


def teacher_folder(root: Path, prediction_type: str) -> Path:
    """A tiny SD pipeline folder of the given prediction type, its UNet briefly pre-trained for that type."""
    import copy

    from sd_distill.tiny.sd import build_tiny_sd_pipeline, ddim_scheduler

    if prediction_type in _FOLDERS:
        return _FOLDERS[prediction_type]
    if "pipe" not in _BASE:
        _BASE["pipe"] = build_tiny_sd_pipeline(None, words=WORDS, unet_blocks=(16, 32, 32), vae_blocks=(8, 16, 16))
    pipe = _BASE["pipe"]
    with torch.no_grad():
        tok = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt")
        emb = pipe.text_encoder(tok.input_ids)[0]
    base_unet = pipe.unet
    pipe.unet = pretrain_unet(copy.deepcopy(base_unet), prediction_type, emb[:2], emb[2:])
    pipe.scheduler = ddim_scheduler(prediction_type)
    folder = root / f"teacher-{prediction_type}"
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.unet = base_unet
    _FOLDERS[prediction_type] = folder
    return folder


@pytest.fixture(scope="session")
def teacher_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods-teachers")


@pytest.fixture(scope="session")
def load_tiny_teacher(teacher_root):
    """A function prediction_type -> Teacher (cached per session)."""
    from sd_distill.distill.teacher import load_teacher

    def load(prediction_type: str):
        if prediction_type not in _TEACHERS:
            _TEACHERS[prediction_type] = load_teacher(str(teacher_folder(teacher_root, prediction_type)))
        return _TEACHERS[prediction_type]

    return load


def prompt_batch(teacher, n_latents: int = 2, seed: int = 0) -> dict:
    """A fixed tiny training batch: unit-variance latents, PROMPTS embeddings, the empty-prompt embedding."""
    from sd_distill.distill.teacher import encode_prompts

    g = torch.Generator().manual_seed(seed)
    size = teacher.unet.config.sample_size
    return {"latents": torch.randn(n_latents, 4, size, size, generator=g),
            "prompt_embeds": encode_prompts(teacher, PROMPTS[:n_latents]),
            "negative_embeds": encode_prompts(teacher, [""])}


def train(method, batch: dict, steps: int, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Adam on one fixed batch; returns the loss curve."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in method.student.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = method.loss(batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def run_phases(cfg, teacher, batch: dict, steps: int, lr: float = 1e-3, verbose: bool = False):
    """Train every phase of ``cfg`` in order (each phase's teacher = the previous student); the last method."""
    from sd_distill.distill.methods import build_method, make_student, plan_phases

    teacher_unet, method = teacher.unet, None
    for phase in plan_phases(cfg):
        student = make_student(cfg, teacher_unet, phase)
        method = build_method(cfg, phase, teacher, teacher_unet, student)
        losses = train(method, batch, steps, lr)
        if verbose:
            print(phase.name, [round(sum(losses[i:i + 10]) / 10, 5) for i in range(0, len(losses), 10)])
        teacher_unet = student.eval().requires_grad_(False)
    return method


GAP_SEEDS = (123,) + tuple(range(10))  # noise draws step_gap averages over (one draw decides too little)


def step_gap(teacher, method, batch: dict, guidance: float, n: int,
             seeds: tuple[int, ...] = GAP_SEEDS) -> dict[str, float]:
    """Relative distances, from the same noise and prompts, to the teacher's guided 2N-step DDIM output, averaged
    over the noise draws ``seeds``: ``student`` (the student at N steps, sampled its own way) and ``teacher_n``
    (the teacher at N steps)."""
    from sd_distill.diffusion.sampling import ddim_sample
    from sd_distill.distill.methods import sample_student
    from sd_distill.distill.methods.common import unpack_batch

    _, c, u = unpack_batch(batch)  # SD hidden states, or SDXL TextCond pairs
    method.student.eval()
    student, teacher_n = [], []
    for seed in seeds:
        z = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(seed))
        ref = ddim_sample(teacher.unet, method.schedule, z, c, u, 2 * n, guidance, teacher.prediction_type)
        t_n = ddim_sample(teacher.unet, method.schedule, z, c, u, n, guidance, teacher.prediction_type)
        s_n = sample_student(method, z, c, u, guidance)
        student.append(float((s_n - ref).norm() / ref.norm()))
        teacher_n.append(float((t_n - ref).norm() / ref.norm()))
    return {"student": sum(student) / len(seeds), "teacher_n": sum(teacher_n) / len(seeds)}
