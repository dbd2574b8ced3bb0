"""Diffusion math (prediction conversions, DDIM step, distillation targets, guidance) and samplers.

``math`` is the one module owning epsilon / x0 / v conversions; ``schedule`` turns a scheduler config into
alpha_t, sigma_t and DDIM timestep grids; ``sampling`` is a plain DDIM sampler used by tests and evaluation hooks.
"""
