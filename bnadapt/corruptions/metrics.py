"""Corruption metrics (Hendrycks & Dietterich, ICLR 2019) and the reference error tables.

With ``E^f_{c,s}`` the top-1 error of model ``f`` on corruption ``c`` at severity ``s`` (s = 1..5),
``E^f_clean`` its clean error, and ``ref`` the reference model (AlexNet for ImageNet-C):

- corruption accuracy of ``c``: ``1 - mean_s E^f_{c,s}`` (paper Table 8);
- mean corruption accuracy ("Corrupt", Table 3): the mean over the 15 corruptions of those;
- clean-corrupt gap: clean accuracy minus mean corruption accuracy;
- ``CE_c = sum_s E^f_{c,s} / sum_s E^ref_{c,s}``, ``mCE = mean over the 15 of CE_c``;
- ``relative CE_c = sum_s (E^f_{c,s} - E^f_clean) / sum_s (E^ref_{c,s} - E^ref_clean)``,
  ``relative mCE`` = its mean over the 15 (a corruption whose reference denominator is not positive
  is left out, and the result says so).

Ratios of sums over severities equal ratios of means, so a reference known only by its mean error per
corruption (AlexNet's published table) serves as well as a per-severity one. All values are fractions
(mCE 0.77 is shown as 77.0).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from bnadapt.corruptions.names import ALL, COMMON
from bnadapt.errors import check
from bnadapt.results import runs_cell

ALEXNET_SOURCE = (
    "Top-1 errors of AlexNet on ImageNet-C, averaged over the 5 severities (Hendrycks & Dietterich, ICLR 2019): "
    "per-corruption values as published in the hendrycks/robustness README table (commit 76d9393, 2019) and as "
    "ALEXNET_ERR in google-research/augmix imagenet.py; clean error = 1 - torchvision AlexNet top-1 56.522%. "
    "Carried from shared/reference/imagenet_c_alexnet_errors.json.")
ALEXNET_CLEAN_ERROR = 0.43478
ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592,
    "contrast": 0.853204, "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
    "speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
}


def alexnet_reference() -> dict:
    """AlexNet's published ImageNet-C errors as a reference table (mean error per corruption)."""
    return {"name": "AlexNet", "kind": "published", "source": ALEXNET_SOURCE, "clean_error": ALEXNET_CLEAN_ERROR,
            "errors": dict(ALEXNET_ERRORS), "per_severity": None}


def reference_from_accuracies(name: str, clean_acc: float | None, accs: Mapping[str, Sequence[float]],
                              source: str) -> dict:
    """A reference table from a model's accuracies (per corruption, severities 1..5) without adaptation."""
    return {"name": name, "kind": "model", "source": source,
            "clean_error": None if clean_acc is None else 1.0 - float(clean_acc),
            "errors": {c: 1.0 - float(np.mean(a)) for c, a in accs.items()},
            "per_severity": {c: [1.0 - float(v) for v in a] for c, a in accs.items()}}


def summarize(clean_acc: float | None, accs: Mapping[str, Sequence[float]], reference: dict | None) -> dict:
    """Every metric of one run: ``accs[c]`` holds the accuracies at severities 1..5 (fractions).

    Returns ``clean``, ``corrupt`` (mean over the evaluated ones of the 15; None if none was),
    ``gap``, ``per_corruption`` (mean accuracy per corruption, hold-out included), ``ce`` and
    ``relative_ce`` per corruption, ``mce`` and ``relative_mce`` (None unless all 15 were evaluated
    and the reference covers them), ``relative_excluded`` and ``missing`` (common corruptions not
    evaluated)."""
    for c, a in accs.items():
        check(len(a) == 5, f"{c}: need accuracies at severities 1..5, got {len(a)}")
    per = {c: float(np.mean(a)) for c, a in accs.items()}
    common = [c for c in COMMON if c in per]
    corrupt = float(np.mean([per[c] for c in common])) if common else None
    gap = None if clean_acc is None or corrupt is None else float(clean_acc) - corrupt
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    excluded = []
    ref_err = (reference or {}).get("errors") or {}
    ref_clean = (reference or {}).get("clean_error")
    for c in (c for c in ALL if c in per):
        err = 1.0 - per[c]
        ce[c] = err / ref_err[c] if ref_err.get(c) else None
        if c in ref_err and clean_acc is not None and ref_clean is not None:
            den = ref_err[c] - ref_clean
            rel[c] = (err - (1.0 - float(clean_acc))) / den if den > 0 else None
            if den <= 0 and c in COMMON:
                excluded.append(c)
        else:
            rel[c] = None
    missing = [c for c in COMMON if c not in per]
    full = not missing and all(ce.get(c) is not None for c in COMMON)
    mce = float(np.mean([ce[c] for c in COMMON])) if full else None
    rel_ok = [rel[c] for c in COMMON if rel.get(c) is not None]
    rmce = float(np.mean(rel_ok)) if (not missing and rel_ok and ref_clean is not None) else None
    return {"clean": clean_acc, "corrupt": corrupt, "gap": gap, "per_corruption": per, "ce": ce,
            "relative_ce": rel, "mce": mce, "relative_mce": rmce, "relative_excluded": excluded, "missing": missing}


SCALARS = ("clean", "corrupt", "gap", "mce", "relative_mce")


def aggregate(runs: Sequence[dict]) -> dict:
    """Mean and 2 sample sd (ddof=1) over runs of each scalar metric and each per-corruption accuracy:
    ``{"clean": cell, ..., "per_corruption": {c: cell}, "relative_excluded": [...], "missing": [...]}``
    with ``cell = {"mean", "two_sd", "runs"}`` (None where a metric is undefined)."""
    cell = runs_cell
    out = {k: cell([r[k] for r in runs]) for k in SCALARS}
    out["per_corruption"] = {c: cell([r["per_corruption"][c] for r in runs]) for c in runs[0]["per_corruption"]}
    out["ce"] = {c: cell([r["ce"][c] for r in runs]) for c in runs[0]["ce"]}
    out["relative_ce"] = {c: cell([r["relative_ce"][c] for r in runs]) for c in runs[0]["relative_ce"]}
    out["relative_excluded"] = sorted({c for r in runs for c in r["relative_excluded"]}, key=ALL.index)
    out["missing"] = runs[0]["missing"]
    return out
