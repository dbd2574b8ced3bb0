"""Distillation of Stable Diffusion teachers into fewer-step / fewer-parameter students.

Layout (one role per module, imported lazily so ``import sd_distill.distill`` stays cheap):

- ``config``   ``DistillParams``: the stage's parameters (teacher, method, trainer, data).
- ``teacher``  loading a teacher pipeline and encoding prompts (helper "methods").
- ``methods/`` one distillation method per file, ``plan_phases`` / ``make_student`` / ``build_method``.
- ``data``     the latent + text-embedding cache built once from the curated shards, and its dataset.
- ``trainer``  the training loop (``train_phase``); side concerns live in ``hooks/`` (EMA, NaN guard,
               checkpoints, progress).
- ``export``   the student as a stock diffusers pipeline folder, with its config and loss curve.
- ``train``    command line for one phase (runs under ``accelerate launch``).
- ``run``      ``distill(...)``: cache -> every phase -> export in one folder, for notebooks.
"""
