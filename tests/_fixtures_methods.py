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


@pytest.fixture(autouse=True)
def single_thread():
    """Two shared cores: one intra-op thread avoids oversubscription (10x slower otherwise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teacher_folder(root: Path, prediction_type: str) -> Path:
    """A tiny SD pipeline folder with the given prediction type (weights shared across types)."""
    from sd_distill.tiny.sd import build_tiny_sd_pipeline

    if prediction_type in _FOLDERS:
        return _FOLDERS[prediction_type]
    if "epsilon" not in _FOLDERS:
        base = root / "teacher-epsilon"
        build_tiny_sd_pipeline(base, prediction_type="epsilon", words=WORDS, unet_blocks=(16, 32, 32),
                               vae_blocks=(8, 16, 16), seed=0)
        _FOLDERS["epsilon"] = base
    if prediction_type != "epsilon":
        folder = root / f"teacher-{prediction_type}"
        shutil.copytree(_FOLDERS["epsilon"], folder)
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["prediction_type"] = prediction_type
        cfg_path.write_text(json.dumps(cfg))
        _FOLDERS[prediction_type] = folder
    return _FOLDERS[prediction_type]


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


def step_gap(teacher, method, batch: dict, guidance: float, n: int, seed: int = 123) -> dict[str, float]:
    """Distances, from the same noise and prompts, to the teacher's guided 2N-step DDIM output:
    ``student`` (the student at N steps, sampled its own way) and ``teacher_n`` (the teacher at N steps)."""
    from sd_distill.diffusion.sampling import ddim_sample
    from sd_distill.distill.methods import sample_student

    z = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(seed))
    c, u = batch["prompt_embeds"], batch["negative_embeds"]
    ref = ddim_sample(teacher.unet, method.schedule, z, c, u, 2 * n, guidance, teacher.prediction_type)
    t_n = ddim_sample(teacher.unet, method.schedule, z, c, u, n, guidance, teacher.prediction_type)
    method.student.eval()
    s_n = sample_student(method, z, c, u, guidance)
    return {"student": float((s_n - ref).norm() / ref.norm()), "teacher_n": float((t_n - ref).norm() / ref.norm())}
