"""The FID InceptionV3: the TensorFlow "2015-12-05" Inception graph that FID and IS are defined with.

Same layers and state-dict keys as torchvision's ``Inception3(num_classes=1008, aux_logits=False)``,
so the published PyTorch ports of the TF weights (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``, pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``)
load directly. It differs from torchvision's ImageNet model where the TF graph does:

1. input: uint8 values resized to 299 x 299 with TF1's bilinear rule (``align_corners=False``,
   no half-pixel centres: source = target * in / out), then scaled by (x - 128) / 128;
2. the average-pool branches of the A, C and first E blocks exclude the padding from the mean;
3. the last E block (Mixed_7c) pools its branch with a 3x3 max pool instead of an average;
4. outputs: the 2048-d average pool (FID's features) and the 1008 class logits without the fc bias
   (torch-fidelity's and torchmetrics' ``logits_unbiased``, the Inception Score's input).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


class _PoolExcludingPadA(tv.InceptionA):
    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return out


class _PoolExcludingPadC(tv.InceptionC):
    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return out


class _PoolExcludingPadE(tv.InceptionE):
    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))
        return out


class _MaxPoolE(tv.InceptionE):
    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return out


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)`` of an [N, C, H, W] float tensor to size x size.

    Output pixel i samples the input at s = i * in / out (no half-pixel offset), interpolating between
    floor(s) and min(floor(s) + 1, in - 1).
    """

    def axis(n_in: int):
        s = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = s.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (s - lo).to(x.dtype)

    lo, hi, w = axis(x.shape[-2])
    x = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    lo, hi, w = axis(x.shape[-1])
    return x[..., lo] * (1 - w) + x[..., hi] * w


class FIDInceptionV3(tv.Inception3):
    """InceptionV3 as the TF FID graph computes it; ``features(images in [0, 1])`` -> (pool [N, 2048], logits [N, 1008])."""

    input_size = 299

    def __init__(self):
        blocks = [tv.BasicConv2d, _PoolExcludingPadA, tv.InceptionB, _PoolExcludingPadC, tv.InceptionD,
                  _PoolExcludingPadE, tv.InceptionAux]
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, inception_blocks=blocks,
                         init_weights=False)
        self.Mixed_7c = _MaxPoolE(2048)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, path: str | Path) -> "FIDInceptionV3":
        """Load a state dict in the torchvision / torch-fidelity key layout (``torch.load(weights_only=True)``)."""
        model = cls()
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not an FID InceptionV3 state dict: missing keys {missing[:5]}, "
                             f"unexpected keys {unexpected[:5]}")
        return model

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-3: [N, 3, H, W] images in [0, 1] -> the 2048-d pool features."""
        x = (x.float().clamp(0, 1) * 255).round()  # the uint8 values the TF graph reads
        x = resize_bilinear_tf1(x, self.input_size)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool [N, 2048], unbiased logits [N, 1008] = pool @ W_fc^T)."""
        pool = self.pool_features(images)
        return pool, pool @ self.fc.weight.T


def find_inception_weights(path: str | None = None) -> Path:
    """The given weights file, or a known FID-Inception file in $TORCH_HOME/hub/checkpoints (never downloaded)."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"FID Inception weights file not found: {p}")
        return p
    root = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"no FID Inception weights: pass inception_weights=<file> or put one of {list(WEIGHT_FILES)} in {root} "
        "(torch-fidelity / pytorch-fid release files); downloads are never attempted")
