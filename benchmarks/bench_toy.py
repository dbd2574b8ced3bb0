"""Toy-world curation measures, from the library functions directly (no Prefect, no download).

    .venv/bin/python benchmarks/bench_toy.py [--n 400] [--seed 123] [--bad-fraction 0.25]

Prints, for a fresh toy sample set (a seed none of the toy models was trained on):

1. the HPS filter (``toy:hps`` through :class:`sd_distill.scoring.hps.HPSScorer`) against the planted bad
   pairs: precision and recall of the *rejected* set, per bad kind, for the curate stage's default rank
   filter (keep the top 70 %) and for thresholds; the ROC AUC of the score separating clean from bad;
2. caption accuracy (:func:`sd_distill.toy.world.caption_accuracy`, attributes parsed back vs truth) of the
   published captions and after recaptioning with ``toy:blip`` (generated captions, and the
   ``choose_caption`` rule: keep the caption the HPS scorer prefers), on all samples and on the kept ones;
3. the toy classifier's and SD teacher's sanity figures: attribute accuracy on clean scenes and on
   ``toy:sd`` generations (DPM-Solver++ 20 steps, guidance 7.5).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def roc_auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U)."""
    diff = scores_pos[:, None] - scores_neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def precision_recall(rejected: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """Precision and recall of ``rejected`` as a detector of ``bad`` (boolean arrays)."""
    tp = float((rejected & bad).sum())
    return (tp / max(1, rejected.sum()), tp / max(1, bad.sum()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--bad-fraction", type=float, default=0.25)
    parser.add_argument("--keep", type=float, default=0.7, help="rank filter: fraction kept (curate default 0.7)")
    parser.add_argument("--sd-prompts", type=int, default=32, help="prompts generated with toy:sd (0 skips)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from sd_distill.captioning.blip import load_captioner
    from sd_distill.captioning.clean import choose_caption
    from sd_distill.scoring.hps import load_hps_scorer
    from sd_distill.toy.classifier import ToyAttributeClassifier
    from sd_distill.toy.world import BAD_KINDS, WEAK_KINDS, caption_accuracy, make_samples

    samples = make_samples(args.n, seed=args.seed, bad_fraction=args.bad_fraction)
    images = [s.image for s in samples]
    published = [s.caption for s in samples]
    truths = [s.truth for s in samples]
    bad = np.array([s.is_bad for s in samples])
    kinds = np.array([s.bad_kind or "clean" for s in samples])
    print(f"toy samples: n={args.n} seed={args.seed} planted bad={bad.sum()} ({', '.join(f'{k}={(kinds == k).sum()}' for k in BAD_KINDS)}); "
          f"good pairs with weak captions={sum(s.caption_kind in WEAK_KINDS for s in samples)}")

    # 1. HPS filter vs planted bad pairs
    t0 = time.perf_counter()
    scorer = load_hps_scorer("toy:hps")
    scores = scorer.score(images, published)
    dt = time.perf_counter() - t0
    print(f"\n[HPS filter] toy:hps scored {args.n} pairs in {dt:.2f} s; mean score clean {scores[~bad].mean():.3f}, "
          f"bad {scores[bad].mean():.3f}; ROC AUC (clean > bad) {roc_auc(scores[~bad], scores[bad]):.3f}")
    for kind in BAD_KINDS:
        print(f"  mean score {kind:13s} {scores[kinds == kind].mean():.3f}   AUC vs clean {roc_auc(scores[~bad], scores[kinds == kind]):.3f}")
    ckinds = np.array([s.caption_kind for s in samples])
    for kind in WEAK_KINDS:
        sel = ckinds == kind
        print(f"  mean score weak:{kind:11s} {scores[sel].mean():.3f}   (good pairs with a weak caption, n={sel.sum()})")
    order = np.lexsort((np.arange(args.n), -scores))
    kept = np.zeros(args.n, bool)
    kept[order[: int(round(args.keep * args.n))]] = True
    p, r = precision_recall(~kept, bad)
    print(f"  rank filter keep top {args.keep:.0%}: rejected {(~kept).sum()}, precision {p:.3f}, recall {r:.3f}; "
          f"bad left among kept {bad[kept].mean():.3f} (was {bad.mean():.3f})")
    print("  recall per kind: " + ", ".join(f"{k} {(~kept & (kinds == k)).sum() / max(1, (kinds == k).sum()):.2f}" for k in BAD_KINDS))
    for thr in np.quantile(scores, [0.15, 0.25, 0.35]):
        p, r = precision_recall(scores < thr, bad)
        print(f"  threshold {thr:.3f}: rejected {(scores < thr).sum()}, precision {p:.3f}, recall {r:.3f}")

    # 2. recaptioning with toy:blip
    t0 = time.perf_counter()
    captioner = load_captioner("toy:blip")
    generated = captioner.caption(images, batch_size=64)
    dt = time.perf_counter() - t0
    sim_gen = scorer.score(images, generated)
    chosen = [choose_caption(o, g, so, sg)[0] for o, g, so, sg in zip(published, generated, scores, sim_gen)]
    clean_img = np.array([k not in ("blur", "noise", "blank") for k in kinds])
    print(f"\n[recaptioning] toy:blip captioned {args.n} images in {dt:.2f} s; e.g. {generated[0]!r}")
    print(f"  {'caption accuracy':38s} {'published':>9s} {'blip':>9s} {'chosen':>9s}")
    for name, sel in (("all samples", np.ones(args.n, bool)), ("kept by the HPS rank filter", kept),
                      ("samples with undamaged images", clean_img)):
        idx = np.flatnonzero(sel)
        acc = [caption_accuracy([c[i] for i in idx], [truths[i] for i in idx]) for c in (published, generated, chosen)]
        print(f"  {name:38s} {acc[0]:9.3f} {acc[1]:9.3f} {acc[2]:9.3f}")
    replaced = sum(c != o for c, o in zip(chosen, published))
    print(f"  choose_caption replaced {replaced} of {args.n} published captions")

    # 3. classifier and SD teacher sanity
    clf = ToyAttributeClassifier.from_pretrained("toy:classifier")
    clean = make_samples(200, seed=args.seed + 1, bad_fraction=0.0)
    print(f"\n[toy:classifier] attribute accuracy on 200 fresh clean scenes: "
          f"{clf.attribute_accuracy([s.image for s in clean], [s.truth for s in clean]):.3f}")
    if args.sd_prompts:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        from sd_distill.modelref import resolve_model_ref

        prompts = [s.true_caption for s in clean[: args.sd_prompts]]
        for name in ("sd", "sd-v"):
            pipe = StableDiffusionPipeline.from_pretrained(resolve_model_ref(f"toy:{name}"), local_files_only=True)
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            out = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, height=32, width=32,
                       generator=torch.Generator().manual_seed(0)).images
            dt = time.perf_counter() - t0
            acc = clf.attribute_accuracy(out, prompts)
            hps = scorer.score(out, prompts).mean()
            print(f"[toy:{name}] {len(prompts)} images, DPM-Solver++ 20 steps, guidance 7.5: attribute accuracy {acc:.3f}, "
                  f"toy-HPS {hps:.3f} (real scenes {scorer.score([s.image for s in clean[:args.sd_prompts]], prompts).mean():.3f}), {dt:.1f} s")


if __name__ == "__main__":
    main()
