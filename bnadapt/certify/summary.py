"""Summaries of a certification TSV: per-sigma certified accuracy and two honest multi-sigma summaries.

Certified accuracy at radius r is the fraction of images whose certified prediction is correct with a
certified radius >= r; as a function of r it is a step function, recorded exactly (``correct_radii``)
so plots draw steps, not lines between sampled radii.

Several sigmas (paper Appendix D, Fig. 3). No summary reads the label before choosing:

- **Envelope of the per-sigma curves** (``envelope_of_curves``): at each radius, the best *fixed*
  sigma's certified accuracy (each curve at level alpha), with that sigma named. This is what the
  paper's Fig. 3 draws: every point is the certified accuracy of one fixed smoothed classifier; the
  choice of sigma per radius is made on the aggregate curves, as one picks sigma for a target radius.
- **Label-free per-image selection** (``per_image_selection``): for each image the sigma whose
  certificate at level ``alpha / k`` has the largest radius (from the counts alone; ties go to the
  first sigma), prediction and radius taken from that sigma, correctness checked afterwards. By the
  union bound each image's selected certificate holds with probability >= 1 - alpha. Caveat: it
  certifies, at that image, the smoothed classifier of the selected sigma; it is not a certificate for
  a classifier that re-selects sigma at every input (input-dependent smoothing needs its own analysis;
  see docs/protocols.md).

The summary bnadapt 0.1 called "envelope" kept, per image, the best radius *among the sigmas where
the prediction was correct*: it looked at the label, so it was an oracle, not any classifier's
certified accuracy. It is gone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bnadapt.certify.rows import read_rows, read_sidecar
from bnadapt.smoothing import ABSTAIN, certified_radius

DEFAULT_RADII = tuple(0.25 * i for i in range(12))
"""L2 radii 0, 0.25, ..., 2.75: the paper's Table 6 layout (plus 0)."""


def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float] = DEFAULT_RADII, *,
                       bonferroni: bool = False, num_images: int | None = None) -> np.ndarray:
    """Fraction of images with ``correct == 1`` and ``radius >= r``, for each ``r`` in ``radii``.

    ``bonferroni=True`` reads ``correct_bonf``/``radius_bonf``. Pass the rows of one sigma (or of a
    selection). The denominator is ``num_images`` (default: the number of rows)."""
    ck, rk = ("correct_bonf", "radius_bonf") if bonferroni else ("correct", "radius")
    total = len(rows) if num_images is None else int(num_images)
    if not rows or total == 0:
        return np.zeros(len(radii))
    correct = np.array([r[ck] for r in rows], dtype=bool)
    radius = np.array([r[rk] for r in rows], dtype=float)
    return np.array([float(np.sum(correct & (radius >= t)) / total) for t in radii])


def correct_radii(rows: Sequence[dict[str, Any]], *, bonferroni: bool = False) -> list[float]:
    """Radii of the correctly certified images, sorted descending: ``acc(r) = #{radii >= r} / N`` exactly."""
    ck, rk = ("correct_bonf", "radius_bonf") if bonferroni else ("correct", "radius")
    return sorted((float(r[rk]) for r in rows if r[ck]), reverse=True)


def accuracy_at(radii_desc: Sequence[float], num_images: int, grid: Sequence[float]) -> np.ndarray:
    """The step function ``#{radii >= r} / num_images`` evaluated on ``grid``."""
    arr = np.sort(np.asarray(radii_desc, dtype=float))
    if num_images <= 0:
        return np.zeros(len(grid))
    return (len(arr) - np.searchsorted(arr, np.asarray(grid, dtype=float), side="left")) / float(num_images)


def envelope_of_curves(per_sigma: dict[str, list[float]], radii: Sequence[float]) -> dict[str, Any]:
    """At each radius the best fixed sigma's certified accuracy, and that sigma (first on ties)."""
    sigmas = list(per_sigma)
    acc = np.array([per_sigma[s] for s in sigmas])  # (k, R)
    best = acc.argmax(axis=0)
    return {"certified_accuracy": [float(acc[b, i]) for i, b in enumerate(best)],
            "sigma": [float(sigmas[b]) for b in best]}


def select_per_image(rows: Sequence[dict[str, Any]], sigmas: Sequence[float], n: int,
                     alpha_bonf: float) -> list[dict[str, Any]]:
    """One row per image: the sigma with the largest radius at ``alpha_bonf`` (computed from ``top`` and
    ``count`` only: the label is never read to choose); abstains when every sigma abstains."""
    order = {float(s): j for j, s in enumerate(sigmas)}
    by_img: dict[int, list[dict]] = {}
    for r in rows:
        by_img.setdefault(r["idx"], []).append(r)
    out = []
    for idx, rs in by_img.items():
        best, best_key = None, None
        for r in sorted(rs, key=lambda r: order.get(float(r["sigma"]), 0)):
            rad = certified_radius(r["count"], n, alpha_bonf, r["sigma"])
            if rad is None:
                continue
            if best_key is None or rad > best_key:
                best, best_key = r, rad
        if best is None:
            out.append({"idx": idx, "label": rs[0]["label"], "sigma": None, "predict": ABSTAIN, "radius": 0.0,
                        "correct": 0})
        else:
            out.append({"idx": idx, "label": best["label"], "sigma": float(best["sigma"]), "predict": best["top"],
                        "radius": float(best_key), "correct": int(best["top"] == best["label"])})
    return out


def summarize(tsv_path: str | os.PathLike, radii: Sequence[float] = DEFAULT_RADII) -> dict[str, Any]:
    """The ``results`` of a certification summary (see the module docstring) from a TSV and its sidecar.

    ``complete`` says whether every image has every sigma; ``partial`` marks a shard's file (the
    numbers then cover that shard only)."""
    path = Path(tsv_path)
    rows = read_rows(path)
    side = read_sidecar(path)
    params = side["params"] if side else None
    warm = (side or {}).get("warmup_s") or {}
    radii = [float(r) for r in radii]
    sigmas = [float(s) for s in params["sigmas"]] if params else sorted({r["sigma"] for r in rows})
    k = len(sigmas)
    alpha = float(params["alpha"]) if params else None
    n = int(params["n"]) if params else None
    alpha_bonf = alpha / k if alpha is not None else None
    images = sorted({r["idx"] for r in rows})
    shard = params.get("shard") if params else None
    if params is None:
        expected = len(images) * k
    elif shard:
        expected = len(range(int(shard[0]), int(params["num_indices"]), int(shard[1]))) * k
    else:
        expected = int(params["num_indices"]) * k
    per_sigma, curves = {}, {}
    for s in sigmas:
        rs = [r for r in rows if r["sigma"] == s]
        acc = certified_accuracy(rs, radii).tolist()
        curves[repr(s)] = acc
        per_sigma[repr(s)] = {
            "num_images": len(rs),
            "certified_accuracy": acc,
            "certified_accuracy_bonf": certified_accuracy(rs, radii, bonferroni=True).tolist(),
            "correct_radii": correct_radii(rs),
            "abstain_rate": float(np.mean([r["predict"] == ABSTAIN for r in rs])) if rs else None,
            "abstain_rate_bonf": (float(np.mean([certified_radius(r["count"], n, alpha_bonf, s) is None for r in rs]))
                                  if rs and n else None),
            "mean_time_s": float(np.mean([r["time"] for r in rs])) if rs else None,
            "warmup_s": warm.get(repr(s)),
        }
    out: dict[str, Any] = {
        "tsv": str(path), "radii": radii, "sigmas": sigmas, "alpha": alpha, "alpha_bonf": alpha_bonf, "n": n,
        "num_images": len(images), "num_rows": len(rows), "complete": len(rows) == expected,
        "partial": bool(shard), "shard": shard,
        "mean_time_s": float(np.mean([r["time"] for r in rows])) if rows else None,
        "per_sigma": per_sigma,
    }
    if k > 1 and rows:
        env = envelope_of_curves(curves, radii)
        env.update(level=alpha, note=f"at each radius the best of {k} fixed sigmas (each curve at level alpha); "
                                     "every point is one fixed smoothed classifier's certified accuracy")
        sel = select_per_image(rows, sigmas, n, alpha_bonf) if n else []
        chosen = [r["sigma"] for r in sel]
        out["envelope_of_curves"] = env
        out["per_image_selection"] = {
            "level": alpha_bonf,
            "certified_accuracy": certified_accuracy(sel, radii, num_images=len(images)).tolist(),
            "correct_radii": correct_radii(sel),
            "sigma_counts": {repr(s): chosen.count(s) for s in sigmas} | {"abstain": chosen.count(None)},
            "note": f"per image the sigma with the largest radius at alpha/{k} (label-free), correctness checked "
                    "afterwards; certifies the selected sigma's smoothed classifier at that image, not a classifier "
                    "that re-selects sigma per input",
        }
    return out
