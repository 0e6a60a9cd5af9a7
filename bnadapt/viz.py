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


def plot_certified(series: Sequence[dict[str, Any]], png: str | os.PathLike, *, title: str | None = None,
                   max_radius: float | None = None) -> Path:
    """Certified accuracy (%) against L2 radius (paper Fig. 1, Fig. 3) as exact step functions on a
    fine grid (never straight lines between sampled radii). ``series`` come from :func:`certified_series`."""
    top = max([2.75] + [max(s.get("radii") or [0.0]) for s in series if "radii" in s]
              + [max(r or [0.0]) for s in series if "curves" in s for r, _ in s["curves"]])
    top = max_radius or top * 1.05 + 0.05
    grid = np.linspace(0.0, top, 1500)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for s in series:
        if s["kind"] == "envelope":
            acc = np.max([_steps(r, n, grid) for r, n in s["curves"]], axis=0)
            ax.plot(grid, acc, color="k", lw=2.2, label=s["label"], drawstyle="steps-post")
        elif s["kind"] == "selection":
            ax.plot(grid, _steps(s["radii"], s["n"], grid), color="0.45", lw=1.6, ls="--", label=s["label"],
                    drawstyle="steps-post")
        else:
            ax.plot(grid, _steps(s["radii"], s["n"], grid), lw=1.4, label=s["label"], drawstyle="steps-post")
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Certified accuracy (randomized smoothing)")
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- streams
def plot_stream(result: dict, png: str | os.PathLike, *, model: str | None = None, batch_size: int | None = None,
                title: str | None = None) -> Path:
    """Accuracy (%) along the stream for every method of a ``stream`` result at one model (default: the
    first) and batch size (default: the smallest): the mean over runs in consecutive segments, drawn as
    steps; the noise level of the first run's stream on a second axis when it varies."""
    res, prm = result["results"], result["inputs"]["params"]
    rows = [r for r in res["rows"] if (model is None or r["model"] == model)]
    if not rows:
        from bnadapt.errors import BnadaptError

        raise BnadaptError(f"no rows for model {model!r} in this stream result; choose one it holds")
    name = rows[0]["model"]
    b = batch_size or min(r["batch_size"] for r in rows if r["model"] == name)
    row = next((r for r in rows if r["model"] == name and r["batch_size"] == b), None)
    if row is None:
        from bnadapt.errors import BnadaptError

        raise BnadaptError(f"batch size {b} is not in this stream result; choose one of {prm['batch_sizes']}")
    edges = np.asarray(res["bin_edges"])
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for k in res["methods"]:
        cell = row["methods"][k]
        if cell is None:
            continue
        y = 100.0 * np.asarray(cell["curve"])
        ax.step(edges, np.append(y, y[-1]), where="post", lw=1.6 if k != "standard" else 1.2,
                ls="--" if k == "standard" else "-", label=f"{k} ({100 * cell['mean']:.1f}%)")
    ax.set_xlabel("position in the stream (images)")
    ax.set_ylabel(f"accuracy per segment of {int(np.diff(edges).mean())} images (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, edges[-1])
    ax.grid(alpha=0.3)
    sig = np.asarray(res["sigma_curve"])
    if sig.size and sig.max() > sig.min():
        ax2 = ax.twinx()
        ax2.step(edges, np.append(sig, sig[-1]), where="post", color="0.5", lw=1.0, ls=":")
        ax2.set_ylabel("noise sigma (run 1, dotted)")
        ax2.set_ylim(0, max(1e-6, sig.max()) * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    st = prm["stream"]
    ax.set_title(title or f"{name}: online accuracy along the stream ({st['scenario']}), batch {b}, {prm['runs']} run(s)")
    return save_png(fig, png)
