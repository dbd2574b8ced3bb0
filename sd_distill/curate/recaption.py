"""Step 4, recaption: a BLIP-family caption per image, both captions cleaned, the better one kept.

For each kept sample:

1. clean the original caption (``sd_distill.captioning.clean.clean_caption``: unicode, URLs, file
   names, stock-photo boilerplate, repeats...);
2. generate a caption with the captioner (``load_captioner(ref, prompt=..., max_new_tokens=...)``,
   batched) and clean it the same way;
3. choose with ``choose_caption`` by the HPS scorer's image-text similarity
   ``s(x, c) = cos(f_I(x), f_T(c))`` (the same towers as the filter's score): the generated caption
   replaces the original only when ``s(x, c_gen) > s(x, c_orig) + margin``; an unusable caption
   always loses to a usable one.

Columns added: ``caption`` (what training uses), ``caption_source`` (``original`` or
``generated:<captioner ref>``) and ``caption_reason`` (the choice and the cleaning rules applied). The
generated caption and both similarities go into ``extra``. A sample with no usable caption at all is
rejected (stage ``recaption``, reason ``no_usable_caption``).

``recaption`` reads the filter step's ``scored.parquet``; ``recaption_partition`` does the same for one
partition of a partitioned run, taking its kept rows from the partition's download folder and the
global filter's decisions.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sd_distill.captioning.clean import choose_caption, clean_caption
from sd_distill.curate import models
from sd_distill.curate.config import CurateParams
from sd_distill.curate.filter import SCORED_FILE, decode_images, kept_rows
from sd_distill.curate.schema import (
    CAPTION_COLUMNS,
    CAPTIONED_SCHEMA,
    IMAGE_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    SCORE_COLUMNS,
    TableWriter,
    iter_table,
    read_table,
    rejects_frame,
    write_rejects,
)
from sd_distill.progress import ProgressFn, report

CAPTIONED_FILE = "captioned.parquet"


def pair_similarities(scorer, images, captions: list[str], batch_size: int) -> np.ndarray:
    """cos(f_I(x_i), f_T(c_i)) per pair; empty captions get NaN (they are never compared)."""
    sims = np.full(len(captions), np.nan, dtype=np.float32)
    idx = [i for i, c in enumerate(captions) if c]
    if idx:
        sims[idx] = scorer.score([images[i] for i in idx], [captions[i] for i in idx], batch_size=batch_size)
    return sims


def recaption(
    params: CurateParams,
    scored_dir: Path,
    out_dir: Path,
    progress: ProgressFn | None = None,
    captioner=None,
    scorer=None,
) -> dict:
    """Clean, generate and choose captions; write ``captioned.parquet`` + ``rejects.parquet``.

    ``captioner`` (``.caption(images, batch_size) -> list[str]``) and ``scorer`` (``.score(images,
    prompts, batch_size)``) may be injected; by default they are loaded from ``params.caption.captioner``
    and ``params.filter.hps_model``.
    """
    c = params.caption
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    required = SAMPLE_COLUMNS + IMAGE_COLUMNS + SCORE_COLUMNS
    df = read_table(scored_dir, SCORED_FILE, required, columns=["key", "source", "url", "caption_original", "extra", "hps_score"])
    n = len(df)
    originals = [clean_caption(t) for t in df["caption_original"]]
    orig_text = [o.text if o.usable else "" for o in originals]

    generated_raw: list[str] = [""] * n
    gen = [None] * n
    sim_o = np.full(n, np.nan, dtype=np.float32)
    sim_g = np.full(n, np.nan, dtype=np.float32)
    if c.enabled and n:
        if captioner is None:
            captioner = models.captioner(params)
        if c.choose_by_similarity and scorer is None:
            scorer = models.hps_scorer(params)
        # decoded images are the big objects: hold one chunk of them at a time
        chunk = 8 * max(c.batch_size, params.filter.batch_size)
        start = 0
        for batch in iter_table(scored_dir, SCORED_FILE, required, chunk, columns=["image"]):
            stop = start + len(batch)
            images = decode_images(batch["image"])
            generated_raw[start:stop] = captioner.caption(images, batch_size=c.batch_size)
            gen[start:stop] = [clean_caption(g) for g in generated_raw[start:stop]]
            if c.choose_by_similarity:
                gen_text = [g.text if g.usable else "" for g in gen[start:stop]]
                sim_o[start:stop] = pair_similarities(scorer, images, orig_text[start:stop], params.filter.batch_size)
                sim_g[start:stop] = pair_similarities(scorer, images, gen_text, params.filter.batch_size)
            report(progress, stop, n, f"captioned {stop}/{n} images")
            start = stop

    label = f"generated:{c.captioner}"
    captions, sources, why, extras, ok = [], [], [], [], []
    for i in range(n):
        o, g = originals[i], gen[i]
        g_text = g.text if g is not None and g.usable else ""
        if g is None:
            cap, src, reason = orig_text[i], "original", "captioning disabled"
        elif not c.choose_by_similarity:
            cap, src, reason = (g_text, "generated", "generated caption preferred") if g_text else (orig_text[i], "original", "generated caption unusable")
        else:
            so = None if np.isnan(sim_o[i]) else float(sim_o[i])
            sg = None if np.isnan(sim_g[i]) else float(sim_g[i])
            cap, src, reason = choose_caption(orig_text[i], g_text, so, sg, margin=c.margin)
        cleaned = (o.changes if src == "original" else g.changes) or []
        if cleaned:
            reason = f"{reason}; cleaned: {', '.join(cleaned)}"
        usable = bool(cap and cap.strip())
        ok.append(usable)
        captions.append(cap)
        sources.append("original" if src == "original" else label)
        why.append(reason if usable else f"original: {o.reason}; generated: {g.reason if g is not None else 'not generated'}")
        extra = json.loads(df["extra"].iat[i] or "{}")
        if g is not None:
            extra["caption_generated"] = generated_raw[i]
            extra["sim_original"] = None if np.isnan(sim_o[i]) else round(float(sim_o[i]), 6)
            extra["sim_generated"] = None if np.isnan(sim_g[i]) else round(float(sim_g[i]), 6)
        extras.append(json.dumps(extra, ensure_ascii=False, default=str))

    out = df.assign(caption=captions, caption_source=sources, caption_reason=why, extra=extras)
    ok_mask = np.array(ok, dtype=bool)
    with TableWriter(out_dir / CAPTIONED_FILE, CAPTIONED_SCHEMA) as writer:  # images copied batch by batch
        start = 0
        for batch in iter_table(scored_dir, SCORED_FILE, required, 1024):
            stop = start + len(batch)
            new = out.iloc[start:stop][["extra", *CAPTION_COLUMNS]].set_index(batch.index)
            batch = batch.drop(columns=["extra"]).join(new)
            writer.write(batch[ok_mask[start:stop]])
            start = stop
    bad = out[~ok_mask]
    n_rejected = write_rejects(rejects_frame(bad, "recaption", "no_usable_caption", bad["caption_reason"], bad["hps_score"]), out_dir / REJECTS_FILE)
    report(progress, n, n, "captions chosen")
    kept = out[ok_mask]
    per_source = {
        str(name): {
            "in": int(len(g)),
            "kept": int(len(kept[kept["source"] == name])),
            "generated": int((kept[kept["source"] == name]["caption_source"] != "original").sum()),
        }
        for name, g in out.groupby("source", sort=True)
    }
    return {
        "in": n,
        "kept": int(ok_mask.sum()),
        "rejected": n_rejected,
        "caption_source": {str(k): int(v) for k, v in kept["caption_source"].value_counts().items()},
        "cleaned_originals": int(sum(bool(o.changes) for o in originals)),
        "per_source": per_source,
    }


def recaption_partition(
    params: CurateParams,
    downloaded_dir: Path,
    filter_dir: Path,
    out_dir: Path,
    progress: ProgressFn | None = None,
    captioner=None,
    scorer=None,
) -> dict:
    """``recaption`` for one partition: its kept rows (``filter_dir``'s decisions on ``downloaded_dir``).

    The kept rows with their images are staged in a temporary folder inside ``out_dir`` and removed
    before returning, so ``out_dir`` holds what ``recaption`` writes and nothing else.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kept-", dir=out_dir))
    try:
        kept_rows(downloaded_dir, filter_dir, staging / SCORED_FILE)
        return recaption(params, staging, out_dir, progress=progress, captioner=captioner, scorer=scorer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
