"""The toy world: synthetic scenes with ground truth, source-format writers, a loopback server, toy models."""

from sd_distill.toy.world import caption_accuracy, caption_for, make_samples, parse_caption  # noqa: F401
from sd_distill.toy.sources import make_eval_prompts, make_toy_sources  # noqa: F401
from sd_distill.toy.server import serve_folder  # noqa: F401
