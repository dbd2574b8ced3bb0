"""HPSv2 (Human Preference Score v2) as a batched scorer that loads its model once.

HPSv2 (Wu et al., 2023, "Human Preference Score v2", arXiv:2306.09341) is OpenCLIP ViT-H-14 fine-tuned
on human preference pairs. Its score for an image x and prompt p is

    HPS(x, p) = <f_I(T(x)) / |f_I(T(x))|, f_T(p) / |f_T(p)|>

the cosine similarity of the image and text embeddings (the diagonal of ``image @ text.T`` in the
reference ``hpsv2.score``; about 0.2-0.3 for the released checkpoints), where T is HPSv2's eval transform:

1. convert to RGB, scale to [0, 1] (``ToTensor``);
2. resize so the longest side equals the model's input size S (bicubic, on the tensor);
3. zero-pad to S x S, the extra pixel of an odd padding going right / bottom;
4. normalise with the OpenAI CLIP mean and std.

HPSv2 skips steps 2-3 when the longest side already equals S, which leaves a non-square tensor the
ViT cannot take; this implementation always pads, and is otherwise the same computation.

The reference ``hpsv2.score`` builds the model once but reloads the checkpoint from disk and scores one
image per forward pass on every call; :class:`HPSScorer` loads once and scores in batches
(``sd_distill.scoring.hps_per_call`` reproduces the per-call path for the benchmark).

Fast path on a GPU: ``load_hps_scorer(..., precision="bf16")`` holds the weights in bf16 (half the memory and
bandwidth of fp32; the scores agree with fp32 to the tolerance ``tests/scoring/test_hps.py`` pins),
``score(..., batch_size=B, num_workers=W)`` preprocesses in W DataLoader workers while the model runs, and
``benchmarks/device_gpu_speed.py`` measures images/s at several batch sizes.
"""

from __future__ import annotations

from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from sd_distill.progress import ProgressFn, report
from sd_distill.scoring.openclip import OpenClipModel, load_open_clip

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPSVersion = Literal["v2.0", "v2.1"]


def hps_pixels(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HPSv2's eval transform T (module docstring, steps 1-4) of one image: a [3, size, size] tensor."""
    x = TF.to_tensor(image if image.mode == "RGB" else image.convert("RGB"))  # step 1
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:  # step 2
        new_h, new_w = round(height * scale), round(width * scale)
        x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        height, width = new_h, new_w
    pad_h, pad_w = size - height, size - width
    if pad_h or pad_w:  # step 3: [left, top, right, bottom]
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, mean=list(mean), std=list(std))  # step 4


class HPSScorer:
    """Batched HPSv2 scoring with one loaded model. Build it with :func:`load_hps_scorer`."""

    def __init__(self, clip: OpenClipModel, version: str):
        self.clip = clip
        self.version = version

    @property
    def source(self) -> str:
        return self.clip.source

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """A batch [N, 3, S, S] of HPS-preprocessed images."""
        return torch.stack([hps_pixels(im, self.clip.image_size, self.clip.mean, self.clip.std) for im in images])

    def image_features(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Unit-norm image embeddings f_I(T(x)) / |f_I(T(x))|, float32 [N, D]."""
        chunks = [self.clip.encode_pixels(self.pixels(images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        return _to_numpy(chunks, self._dim())

    def text_features(self, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Unit-norm text embeddings f_T(p) / |f_T(p)|, float32 [N, D]."""
        chunks = [self.clip.encode_texts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return _to_numpy(chunks, self._dim())

    def pixel_batches(self, images: Sequence[Image.Image], batch_size: int = 32,
                      num_workers: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, [B, 3, S, S]) for each batch of ``images``, preprocessed with T.

        ``num_workers`` > 0: T runs in that many DataLoader worker processes, up to two batches per worker ahead
        of the model, pinned on CUDA so the copy to the device is asynchronous; the pixels are the same."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if num_workers == 0:
            for start in range(0, len(images), batch_size):
                yield start, self.pixels(images[start:start + batch_size])
            return
        loader = torch.utils.data.DataLoader(
            _HPSPixels(images, self.clip.image_size, self.clip.mean, self.clip.std), batch_size=batch_size,
            num_workers=num_workers, pin_memory=self.clip.device.type == "cuda")
        for i, pixels in enumerate(loader):
            yield i * batch_size, pixels

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 32,
              progress: Optional[ProgressFn] = None, num_workers: int = 0) -> np.ndarray:
        """HPS(x_i, p_i) for each pair, float32 [N] (the diagonal of image @ text.T, batch by batch).

        ``num_workers`` > 0 preprocesses in DataLoader workers (:meth:`pixel_batches`), off the model's path; the
        scores of a batch are read back while the next batch's forward is already queued."""
        if len(images) != len(prompts):
            raise ValueError(f"score() needs one prompt per image: got {len(images)} images, {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = np.empty(len(images), dtype=np.float32)
        pending: list[tuple[int, torch.Tensor]] = []
        for start, pixels in self.pixel_batches(images, batch_size, num_workers):
            stop = start + len(pixels)
            img = self.clip.encode_pixels(pixels)
            txt = self.clip.encode_texts(prompts[start:stop])
            pending.append((start, (img * txt).sum(dim=-1)))
            if len(pending) > 1:  # the previous batch: its read waits on work queued before this batch's
                self._collect(out, *pending.pop(0))
            report(progress, stop, len(images), f"HPS {self.version}")
        for start, scores in pending:
            self._collect(out, start, scores)
        return out

    @staticmethod
    def _collect(out: np.ndarray, start: int, scores: torch.Tensor) -> None:
        out[start:start + len(scores)] = scores.cpu().numpy()

    def similarity_matrix(self, images: Sequence[Image.Image], prompts: Sequence[str],
                          batch_size: int = 32) -> np.ndarray:
        """Cosine similarity of every image with every prompt, float32 [N_images, N_prompts]."""
        return self.image_features(images, batch_size) @ self.text_features(prompts).T

    def _dim(self) -> int:
        proj = getattr(self.clip.model, "text_projection", None)
        return int(proj.shape[-1]) if isinstance(proj, torch.Tensor) else 0


class _HPSPixels(torch.utils.data.Dataset):
    """T of each image, for DataLoader workers (holds the images and T's constants only)."""

    def __init__(self, images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]):
        self.images, self.size, self.mean, self.std = images, size, mean, std

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return hps_pixels(self.images[i], self.size, self.mean, self.std)


def _to_numpy(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(chunks).cpu().numpy().astype(np.float32)


def load_hps_scorer(
    ref: str,
    version: HPSVersion = "v2.1",
    device: str = "cpu",
    arch: str = "ViT-H-14",
    precision: str = "fp32",
) -> HPSScorer:
    """Load an HPSv2 scorer once.

    ``ref``: an HPS checkpoint file (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, a
    ``{"state_dict": ...}`` loaded with ``torch.load(weights_only=True)`` into ``arch``), an open_clip
    hub-layout folder, a folder holding the version's checkpoint file, ``toy:<name>``, or the hub id
    ``xswu/HPSv2`` (the version's file; fetched only with downloads allowed, else from the HF cache).
    ``version`` picks the file in folders and hub repos and is recorded with every score.
    """
    if version not in HPS_FILES:
        raise ValueError(f"HPS version {version!r} is not one of {sorted(HPS_FILES)}")
    # only the requested version's file: a v2.0 file must never be scored and labelled as v2.1
    clip = load_open_clip(ref, arch=arch, device=device, precision=precision, checkpoint_names=[HPS_FILES[version]])
    return HPSScorer(clip, version)
