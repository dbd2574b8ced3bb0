"""BK-SDM block-removed students and their knowledge-distillation loss (Kim et al. 2023, "BK-SDM: A Lightweight,
Fast, and Cheap Version of Stable Diffusion", sec. 3).

Architectures (BK-SDM model card; SD's UNet has 2 (resnet, attention) pairs per down stage and 3 per up stage):
  * ``bk-base``:  one pair per down stage, two per up stage (the first and the last pair are kept);
  * ``bk-small``: bk-base without the mid block;
  * ``bk-tiny``:  bk-small without the innermost down stage and the outermost up stage.
Kept blocks are initialised from the teacher's weights with the same mapping BK-SDM uses (up stage pair 1 of the
student <- the teacher's last pair; for tiny, student up stage i <- teacher up stage i + 1).

Loss (BK-SDM eq. 3-5): L = w_task ||y_S - y*||^2 + w_out ||y_S - y_T||^2 + w_feat sum_l ||f_S^l - f_T^l||^2, where y* is
the true target of the teacher's prediction type (eps, x0 or v for the sampled (x, eps, t)), y_T / y_S the
teacher's / student's outputs and f^l the outputs of each down and up stage.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from sd_distill.diffusion.math import add_noise, convert
from sd_distill.distill.methods.config import MethodConfig, PhaseSpec, training_schedule
from sd_distill.distill.methods.common import random_timesteps, randn, unpack_batch, uniform

ARCHS = ("bk-base", "bk-small", "bk-tiny")
_PER_BLOCK_KEYS = ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "only_cross_attention",
                   "cross_attention_dim", "layers_per_block", "reverse_transformer_layers_per_block")
UNCOND_PROB = 0.1  # share of samples trained on the negative (empty) prompt, as in SD's own training recipe


def _layers(config) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        if len(set(lpb)) != 1:
            raise ValueError(f"block removal needs the same layers_per_block in every stage, got {lpb}")
        lpb = lpb[0]
    return int(lpb)


def block_removed_config(teacher_config, arch: str) -> dict:
    """The student UNet config for ``arch`` (a plain dict for ``UNet2DConditionModel.from_config``)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown BK-SDM student_arch {arch!r}; valid: {list(ARCHS)}")
    config = dict(teacher_config)
    layers = _layers(config)
    if layers < 2:
        raise ValueError(f"BK-SDM block removal needs a teacher with layers_per_block >= 2, got {layers}")
    config["layers_per_block"] = 1
    if arch in ("bk-small", "bk-tiny"):
        config["mid_block_type"] = None
    if arch == "bk-tiny":
        n = len(config["down_block_types"])
        if n < 3:
            raise ValueError(f"bk-tiny removes a stage; the teacher has only {n} down stages")
        config["down_block_types"] = list(config["down_block_types"])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        config["block_out_channels"] = list(config["block_out_channels"])[:-1]
        for key in _PER_BLOCK_KEYS:
            value = config.get(key)
            if isinstance(value, (list, tuple)) and len(value) == n:
                config[key] = list(value)[1:] if key.startswith("reverse") else list(value)[:-1]
    return config


def teacher_name(student_name: str, arch: str, teacher_layers: int) -> str:
    """The teacher parameter a student parameter is initialised from."""
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_name)
    if m:
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block += 1 if arch == "bk-tiny" else 0
        j = teacher_layers if j == 1 else j  # student's last pair <- teacher's last pair
        return f"up_blocks.{block}.{kind}.{j}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(.*)", student_name)
    if m and arch == "bk-tiny":
        return f"up_blocks.{int(m[1]) + 1}.{m[2]}"
    return student_name


def block_removed_unet(teacher_unet, arch: str):
    """A BK-SDM student built from ``teacher_unet``'s config, every kept block copied from the teacher.

    Parameters without a same-shaped teacher counterpart keep their fresh init; their names are in
    ``student.bk_uncopied`` (empty for SD-layout UNets).
    """
    from diffusers import UNet2DConditionModel  # deferred: heavy (diffusers)

    student = UNet2DConditionModel.from_config(block_removed_config(teacher_unet.config, arch))
    teacher_state = teacher_unet.state_dict()
    layers = _layers(teacher_unet.config)
    new_state, uncopied = {}, []
    for name, param in student.state_dict().items():
        src = teacher_state.get(teacher_name(name, arch, layers))
        if src is not None and src.shape == param.shape:
            new_state[name] = src.detach().clone()
        else:
            new_state[name] = param
            uncopied.append(name)
    student.load_state_dict(new_state)
    student.bk_uncopied = uncopied
    p = next(teacher_unet.parameters())
    return student.to(device=p.device, dtype=p.dtype)


def feature_pairs(teacher_config, arch: str) -> list[tuple[str, str]]:
    """(student module, teacher module) pairs whose outputs feature KD matches: every down and up stage; for tiny,
    the innermost kept down stage (which loses its downsampler) is matched at its last attention's proj_out."""
    n = len(teacher_config["down_block_types"])
    layers = _layers(teacher_config)
    if arch != "bk-tiny":
        return [(f"{s}.{i}", f"{s}.{i}") for s in ("down_blocks", "up_blocks") for i in range(n)]
    pairs = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(n - 2)]
    inner = n - 2
    if "CrossAttn" in teacher_config["down_block_types"][inner]:
        pairs.append((f"down_blocks.{inner}.attentions.0.proj_out", f"down_blocks.{inner}.attentions.{layers - 1}.proj_out"))
    else:
        pairs.append((f"down_blocks.{inner}.resnets.0", f"down_blocks.{inner}.resnets.{layers - 1}"))
    pairs += [(f"up_blocks.{i}", f"up_blocks.{i + 1}") for i in range(n - 1)]
    return pairs


def _capture(store: dict, name: str):
    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        store[name] = out

    return hook


class BkSdmDistillation:
    """Task + output-KD + feature-KD training of a block-removed student (one phase, no step reduction)."""

    w_conditioned = False

    def __init__(self, cfg, phase, teacher, teacher_unet, student_unet):
        self.cfg, self.phase = cfg, phase
        self.student, self.teacher_unet = student_unet, teacher_unet
        self.schedule = training_schedule(cfg, teacher.schedule)
        self.prediction_type = teacher.prediction_type
        self.student_steps = phase.student_steps
        self.pairs = feature_pairs(teacher_unet.config, cfg.student_arch)
        self._feats_s: dict[str, Tensor] = {}
        self._feats_t: dict[str, Tensor] = {}
        s_mods, t_mods = dict(student_unet.named_modules()), dict(teacher_unet.named_modules())
        self._handles = []
        for s_name, t_name in self.pairs:
            if s_name not in s_mods or t_name not in t_mods:
                raise ValueError(f"feature KD: module {s_name!r} (student) / {t_name!r} (teacher) not found; is the "
                                 f"student a {cfg.student_arch} of this teacher?")
            self._handles.append(s_mods[s_name].register_forward_hook(_capture(self._feats_s, s_name)))
            self._handles.append(t_mods[t_name].register_forward_hook(_capture(self._feats_t, t_name)))

    def close(self) -> None:
        """Remove the feature hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x0, cond, uncond = unpack_batch(batch)
        n, device, dtype = x0.shape[0], x0.device, x0.dtype
        # 1. noise at a random training timestep; some samples on the negative prompt (keeps CFG usable)
        t = random_timesteps(n, self.schedule.num_train_timesteps, generator, device)
        alpha_t, sigma_t = (v.to(dtype) for v in self.schedule.alphas_sigmas(t, device=device))
        eps = randn(x0.shape, generator, device, dtype)
        z_t = add_noise(x0, eps, alpha_t, sigma_t)
        drop = (uniform(n, 0.0, 1.0, generator, device) < UNCOND_PROB).reshape(-1, 1, 1)
        text = torch.where(drop, uncond, cond)
        # 2. teacher and student outputs, features captured by the hooks
        with torch.no_grad():
            y_t = self.teacher_unet(z_t, t, encoder_hidden_states=text).sample
        y_s = self.student(z_t, t, encoder_hidden_states=text).sample
        target = convert(eps, z_t, alpha_t, sigma_t, "epsilon", self.prediction_type)
        # 3. the three terms
        l_task = (y_s.float() - target.float()).pow(2).mean()
        l_out = (y_s.float() - y_t.float()).pow(2).mean()
        l_feat = y_s.new_zeros((), dtype=torch.float32)
        for s_name, t_name in self.pairs:
            fs, ft = self._feats_s[s_name], self._feats_t[t_name]
            if fs.shape != ft.shape:
                raise ValueError(f"feature KD shape mismatch: student {s_name} {tuple(fs.shape)} vs teacher {t_name} "
                                 f"{tuple(ft.shape)}")
            l_feat = l_feat + (fs.float() - ft.float()).pow(2).mean()
        self._feats_s.clear()
        self._feats_t.clear()
        total = self.cfg.kd_task_weight * l_task + self.cfg.kd_out_weight * l_out + self.cfg.kd_feat_weight * l_feat
        logs = {"loss": total.detach(), "loss_task": l_task.detach(), "loss_kd_out": l_out.detach(),
                "loss_kd_feat": l_feat.detach()}
        return total, logs


def kd_phases(cfg: MethodConfig, first_steps: int) -> list[PhaseSpec]:
    """``[the KD phase]`` of a step method when ``cfg.kd_steps`` > 0, else ``[]``: the block-removed student trained
    by this loss before step distillation. ``first_steps``: the step count the first step phase samples its teacher
    at (the KD-trained light UNet is that teacher)."""
    if not cfg.kd_steps:
        return []
    return [PhaseSpec(index=0, name=f"bksdm-kd-{cfg.student_arch}-{cfg.kd_steps}", teacher_steps=first_steps,
                      student_steps=first_steps, kind="bksdm_kd", max_steps=cfg.kd_steps, lr=cfg.kd_lr,
                      batch_size=cfg.kd_batch_size)]


def plan(cfg: MethodConfig) -> list[PhaseSpec]:
    """One phase: architecture distillation at the teacher's own step count (teacher_steps = student_steps)."""
    return [PhaseSpec(index=0, name=f"bksdm-kd-{cfg.student_arch}", teacher_steps=cfg.student_steps,
                      student_steps=cfg.student_steps, kind="bksdm_kd")]
