"""Every figure, drawn from result files only (matplotlib, Agg canvas, written atomically as PNG).

One function per kind of figure; each takes result dicts (as :func:`bnadapt.results.read_result`
returns them) or numbers taken from them, labels its axes with units, and returns the PNG path.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bnadapt.results import atomic_write_bytes


def _figure(w: float = 6.0, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------- certification
def _steps(radii_desc: Sequence[float], num_images: int, grid: np.ndarray) -> np.ndarray:
    from bnadapt.certify.summary import accuracy_at

    return 100.0 * accuracy_at(radii_desc, num_images, grid)


def certified_series(result: dict, *, label: str | None = None, summary_only: bool = False) -> list[dict[str, Any]]:
    """Curves of a ``certify`` result: one per sigma, and for several sigmas the envelope of the
    per-sigma curves (best fixed sigma at each radius) and the label-free per-image selection. Each
    curve is exact (a step function of the radius). ``summary_only`` keeps one curve per run: the
    sigma's for one sigma, else the envelope."""
    res = result["results"]
    n_img = res["num_images"]
    name = label or result["inputs"]["models"][0]["name"]
    out = []
    per = res["per_sigma"]
    if len(per) == 1 or not summary_only:
        for s, d in per.items():
            out.append({"label": f"{name}, sigma = {float(s):g}" if summary_only or label else f"sigma = {float(s):g}",
                        "radii": d["correct_radii"], "n": d["num_images"] or n_img, "kind": "sigma"})
    if len(per) > 1:
        out.append({"label": f"{name + ', ' if summary_only or label else ''}envelope of curves (best fixed sigma)",
                    "curves": [(d["correct_radii"], d["num_images"] or n_img) for d in per.values()], "kind": "envelope"})
        if not summary_only:
            sel = res["per_image_selection"]
            out.append({"label": f"per-image selection (label-free, alpha/{len(per)})", "radii": sel["correct_radii"],
                        "n": n_img, "kind": "selection"})
    return out


def certified_points(series: Sequence[dict[str, Any]], max_radius: float | None = None,
                     points: int = 1500) -> tuple[np.ndarray, list[np.ndarray]]:
    """The fine radius grid (``points`` radii from 0 to just past the largest certified radius, at least
    2.75) and each series' certified accuracy (%) on it: exact step functions, so a curve drops exactly
    where an image's certified radius ends, not along a line between sampled radii."""
    top = max([2.75] + [max(s.get("radii") or [0.0]) for s in series if "radii" in s]
              + [max(r or [0.0]) for s in series if "curves" in s for r, _ in s["curves"]])
    top = max_radius or top * 1.05 + 0.05
    grid = np.linspace(0.0, top, points)
    ys = []
    for s in series:
        if s["kind"] == "envelope":
            ys.append(np.max([_steps(r, n, grid) for r, n in s["curves"]], axis=0))
        else:
            ys.append(_steps(s["radii"], s["n"], grid))
    return grid, ys


def plot_certified(series: Sequence[dict[str, Any]], png: str | os.PathLike, *, title: str | None = None,
                   max_radius: float | None = None) -> Path:
    """Certified accuracy (%) against L2 radius (paper Fig. 1, Fig. 3) from :func:`certified_points`.
    ``series`` come from :func:`certified_series`."""
    grid, ys = certified_points(series, max_radius)
    top = float(grid[-1])
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for s, y in zip(series, ys):
        style = {"envelope": dict(color="k", lw=2.2), "selection": dict(color="0.45", lw=1.6, ls="--")}.get(
            s["kind"], dict(lw=1.4))
        ax.plot(grid, y, label=s["label"], drawstyle="steps-post", **style)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Certified accuracy (randomized smoothing)")
    return save_png(fig, png)
