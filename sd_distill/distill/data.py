"""Latent + text-embedding cache: the VAE and the text encoder run once, not every epoch.

``build_latent_cache`` reads the curated Parquet shards (docs/design.md, "Curated shards": ``image`` bytes and
the training ``caption``, read with the curate stage's checked reader), resizes each image's shorter side to ``resolution`` and center-crops it, then writes

- ``shard-00000.safetensors`` ...  ``latent_mean`` / ``latent_std`` [n, 4, h, w]: the VAE posterior
  N(mean, std^2) already multiplied by the VAE's ``scaling_factor`` (minus ``shift_factor`` when the VAE has one),
  and ``prompt_embeds`` [n, L, D] from the teacher's text encoder; or, with ``cache_latents=False``,
  ``pixels`` [n, 3, H, W] uint8 for the trainer to encode each step; SDXL teachers add
  ``pooled_prompt_embeds`` [n, P] and ``time_ids`` [n, 6] (see :mod:`sd_distill.distill.teacher`);
- ``negative.safetensors``        ``negative_embeds`` [1, L, D] (the negative / empty prompt for CFG), and for SDXL
  ``negative_pooled_embeds`` [1, P];
- ``samples.parquet``             key, caption, shard, row for every cached sample;
- ``index.json``                  format, teacher, resolution, shapes, dtype, shards, counts.

``LatentDataset`` reads the cache back (memory-mapped, row by row) and builds training batches in the
``DistillMethod.loss`` format: ``latents``, ``prompt_embeds``, ``negative_embeds`` (SDXL: also
``pooled_prompt_embeds``, ``negative_pooled_embeds``, ``time_ids``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_distill.curate.shards import iter_curated
from sd_distill.distill.methods.students import check_student_arch
from sd_distill.distill.teacher import (check_teacher_folder, encode_negative, encode_prompts, is_sdxl_index, load_teacher,
                                        native_resolution)
from sd_distill.modelref import resolve_model_ref
from sd_distill.progress import ProgressFn, report

CACHE_FORMAT = "sd_distill.latent_cache/1"
INDEX = "index.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- reading
def curated_shard_files(curated_dir: str | Path) -> list[Path]:
    """The curated stage's ``part-*.parquet`` files, sorted; a clear error when there are none."""
    curated_dir = Path(curated_dir)
    if not curated_dir.is_dir():
        raise FileNotFoundError(f"curated folder {curated_dir} does not exist")
    files = sorted(curated_dir.glob("part-*.parquet"))
    if not files:
        raise ValueError(f"empty dataset: no part-*.parquet shards in curated folder {curated_dir}")
    return files


def iter_curated_rows(
    curated_dir: str | Path, caption_column: str = "caption", batch_rows: int = 256
) -> Iterator[tuple[str, bytes, str]]:
    """(key, encoded image bytes, caption) for every curated row, streamed shard by shard.

    Reads through the curate stage's checked reader (``sd_distill.curate.shards.iter_curated``): a shard missing
    a column, or with a mistyped one, fails naming the file and the column.
    """
    curated_shard_files(curated_dir)  # "empty dataset" before anything else
    for frame in iter_curated(Path(curated_dir), columns=["key", "image", caption_column], batch_rows=batch_rows):
        yield from zip(frame["key"].astype(str), frame["image"], frame[caption_column])


def image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """Encoded image -> uint8 [3, R, R]: shorter side resized to R (bicubic, antialiased), center crop."""
    from torchvision.transforms import functional as TF  # deferred: heavy (torchvision)

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        im = TF.center_crop(im, [resolution, resolution])
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------- encoding
def latent_scaling(vae) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of a diffusers AutoencoderKL config (shift 0 when absent)."""
    cfg = vae.config
    return float(cfg.scaling_factor), float(getattr(cfg, "shift_factor", None) or 0.0)


@torch.no_grad()
def encode_pixels(vae, pixels_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [B,3,H,W] -> (mean, std) of the scaled VAE posterior: z = (mean + std * n)."""
    scale, shift = latent_scaling(vae)
    param = next(vae.parameters())
    x = pixels_uint8.to(param.device, param.dtype) / 127.5 - 1.0
    dist = vae.encode(x).latent_dist
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()


def build_latent_cache(
    teacher_ref: str,
    curated_dir: str | Path,
    out_dir: str | Path,
    resolution: Optional[int] = None,
    batch_size: int = 16,
    progress: Optional[ProgressFn] = None,
    *,
    caption_column: str = "caption",
    max_samples: Optional[int] = None,
    negative_prompt: str = "",
    cache_latents: bool = True,
    dtype: str = "float16",
    shard_rows: int = 1024,
    device: Optional[str] = None,
) -> dict:
    """Encode the curated shards once with the teacher's VAE and text encoder; returns the cache's counts."""

    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {sorted(DTYPES)}")
    shards_in = curated_shard_files(curated_dir)  # fail on an empty dataset before loading any model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(teacher_ref, device=device)
    resolution = resolution or native_resolution(teacher)
    store = DTYPES[dtype]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in shards_in)
    total = min(total, max_samples) if max_samples is not None else total

    rows: list[dict] = []
    shards: list[dict] = []
    pending: dict[str, list[torch.Tensor]] = {}
    skipped: dict[str, int] = {}

    def flush() -> None:
        if not pending:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
        save_file(tensors, str(out_dir / name))
        shards.append({"file": name, "rows": int(tensors["prompt_embeds"].shape[0])})
        pending.clear()

    def encode(batch: list[tuple[str, torch.Tensor, str]]) -> None:
        pixels = torch.stack([b[1] for b in batch])
        text = encode_prompts(teacher, [b[2] for b in batch], resolution).float().cpu()
        if cache_latents:
            mean, std = encode_pixels(teacher.vae, pixels)
            new = {"latent_mean": mean.cpu().to(store), "latent_std": std.cpu().to(store)}
        else:
            new = {"pixels": pixels}
        if teacher.is_sdxl:  # time ids stay float32: bf16 cannot hold e.g. 1000 exactly
            new.update(prompt_embeds=text.hidden.to(store), pooled_prompt_embeds=text.pooled.to(store),
                       time_ids=text.time_ids.float())
        else:
            new["prompt_embeds"] = text.to(store)
        already = sum(len(t) for t in pending.get("prompt_embeds", []))
        for k, v in new.items():
            pending.setdefault(k, []).append(v)
        for j, (key, _, caption) in enumerate(batch):
            rows.append({"key": key, "caption": caption, "shard": len(shards), "row": already + j})
        if already + len(batch) >= shard_rows:
            flush()

    batch: list[tuple[str, torch.Tensor, str]] = []
    seen = 0
    for key, data, caption in iter_curated_rows(curated_dir, caption_column):
        if max_samples is not None and seen >= max_samples:
            break
        seen += 1
        if not isinstance(caption, str) or not caption.strip():
            skipped["empty_caption"] = skipped.get("empty_caption", 0) + 1
            continue
        try:
            batch.append((key, image_tensor(data, resolution), caption))
        except Exception:  # undecodable bytes: counted, never silently dropped
            skipped["undecodable_image"] = skipped.get("undecodable_image", 0) + 1
            continue
        if len(batch) == batch_size:
            encode(batch)
            batch = []
            report(progress, seen, total, f"cached {len(rows)} samples")
    if batch:
        encode(batch)
    flush()
    if not rows:
        raise ValueError(
            f"empty dataset: curated folder {curated_dir} yielded no usable samples "
            f"(read {seen} rows, skipped {skipped or 'none'})"
        )

    negative = encode_negative(teacher, negative_prompt, resolution).float().cpu()
    if teacher.is_sdxl:
        tensors = {"negative_embeds": negative.hidden, "negative_pooled_embeds": negative.pooled}
        negative = negative.hidden
    else:
        tensors = {"negative_embeds": negative}
    save_file({k: v.to(store).contiguous() for k, v in tensors.items()}, str(out_dir / "negative.safetensors"))
    pd.DataFrame(rows).to_parquet(out_dir / "samples.parquet", index=False)
    scale, shift = latent_scaling(teacher.vae)
    index = {
        "format": CACHE_FORMAT,
        "teacher": teacher_ref,
        "resolution": resolution,
        "cache_latents": cache_latents,
        "dtype": dtype,
        "scaling_factor": scale,
        "shift_factor": shift,
        "negative_prompt": negative_prompt,
        "caption_column": caption_column,
        "embed_shape": list(negative.shape[1:]),
        "shards": shards,
        **({"sdxl": {"pooled_dim": int(tensors["negative_pooled_embeds"].shape[-1]),
                     "time_ids": [resolution, resolution, 0, 0, resolution, resolution],
                     "force_zeros_for_empty_prompt": teacher.force_zeros_for_empty_prompt}} if teacher.is_sdxl else {}),
        "num_samples": len(rows),
        "rows_read": seen,
        "skipped": skipped,
    }
    (out_dir / INDEX).write_text(json.dumps(index, indent=1))
    report(progress, total, total, f"cached {len(rows)} samples")
    return {"samples": len(rows), "rows_read": seen, "skipped": skipped, "shards": len(shards), "resolution": resolution}


# ----------------------------------------------------------------------------------------------- dataset
def cache_index(cache_dir: str | Path) -> dict:
    """The cache's index.json, checked: a clear error for a missing, foreign or empty cache."""
    path = Path(cache_dir) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: {cache_dir} is not a latent cache (run build_latent_cache first)")
    index = json.loads(path.read_text())
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {CACHE_FORMAT!r}")
    if not index.get("num_samples"):
        raise ValueError(f"empty dataset: latent cache {cache_dir} holds no samples")
    return index


class LatentDataset:
    """Random access to a latent cache; ``batch(indices, generator)`` gives a DistillMethod batch."""

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)
        self.index = cache_index(self.cache_dir)
        self.cache_latents = bool(self.index["cache_latents"])
        self._rows: list[tuple[int, int]] = [(s, r) for s, sh in enumerate(self.index["shards"]) for r in range(sh["rows"])]
        self._handles: dict[int, object] = {}
        negative = load_file(str(self.cache_dir / "negative.safetensors"))
        self.negative_embeds = negative["negative_embeds"].float()
        pooled = negative.get("negative_pooled_embeds")  # SDXL caches only
        self.negative_pooled = pooled.float() if pooled is not None else None

    def __len__(self) -> int:
        return len(self._rows)

    def _shard(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(str(self.cache_dir / self.index["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def item(self, i: int) -> dict[str, torch.Tensor]:
        s, r = self._rows[i]
        f = self._shard(s)
        return {k: f.get_slice(k)[r : r + 1] for k in f.keys()}

    def batch(
        self, indices: Sequence[int], generator: Optional[torch.Generator] = None, sample_posterior: bool = False, device="cpu"
    ) -> dict[str, torch.Tensor]:
        """Stacked rows as float32 on ``device``: latents (posterior mean, or a draw with ``generator``),
        prompt_embeds, negative_embeds (SDXL: pooled_prompt_embeds, negative_pooled_embeds, time_ids);
        ``pixels`` (uint8) instead of latents for a cache without latents."""
        items = [self.item(i) for i in indices]
        out = {k: torch.cat([it[k] for it in items]) for k in items[0]}
        batch = {"prompt_embeds": out["prompt_embeds"].to(device, torch.float32)}
        batch["negative_embeds"] = self.negative_embeds.to(device).expand(len(indices), -1, -1).contiguous()
        if self.negative_pooled is not None:
            batch["pooled_prompt_embeds"] = out["pooled_prompt_embeds"].to(device, torch.float32)
            batch["negative_pooled_embeds"] = self.negative_pooled.to(device).expand(len(indices), -1).contiguous()
            batch["time_ids"] = out["time_ids"].to(device, torch.float32)
        if not self.cache_latents:
            batch["pixels"] = out["pixels"].to(device)
            return batch
        latents = out["latent_mean"].to(device, torch.float32)
        if sample_posterior:
            std = out["latent_std"].to(device, torch.float32)
            latents = latents + std * torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
        batch["latents"] = latents
        return batch


def micro_batch_indices(n: int, batch_size: int, position: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Dataset rows of micro-batch ``position`` for process ``rank``: exact-resume data order.

    The sample stream is an endless sequence of epochs, each a permutation of ``range(n)`` seeded by
    (seed, epoch); global micro-batch p covers stream items [p*B*W, (p+1)*B*W) and process ``rank`` takes
    its B-wide slice. Resuming only needs ``position``.
    """
    start = (position * world + rank) * batch_size
    out = []
    cache: dict[int, torch.Tensor] = {}
    for g in range(start, start + batch_size):
        epoch = g // n
        if epoch not in cache:
            cache[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(cache[epoch][g % n]))
    return out


def cache_latents(params, curated_dir: str | Path, out_dir: str | Path, progress: Optional[ProgressFn] = None) -> dict:
    """The cache step of the distill stage: ``build_latent_cache`` with the values of ``DistillParams``.

    Refuses up front what a later phase would refuse for an SDXL teacher (block-removed students).
    """
    check_student_arch(params.method.student_arch, is_sdxl_index(check_teacher_folder(resolve_model_ref(params.teacher))))
    d = params.data
    return build_latent_cache(
        params.teacher, curated_dir, out_dir, d.resolution, d.cache_batch_size, progress,
        caption_column=d.caption_column, max_samples=d.max_samples, negative_prompt=d.negative_prompt,
        cache_latents=d.cache_latents, dtype=d.cache_dtype, shard_rows=d.shard_rows,
        device="cpu" if params.trainer.device == "cpu" else None,
    )
