"""curate-and-distill library: curation, distillation and evaluation of Stable Diffusion models.

Plain Python and PyTorch; no Prefect (that lives in ``tasks/`` and ``flows/``).
"""

__version__ = "0.1.0"
