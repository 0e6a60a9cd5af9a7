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
                    "curves": [(d["correct_radii"], d["num_images"] or n_img) for d in per.values()], "kind": "envelope",
                    "overlay": summary_only})
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
        if s.get("overlay"):  # one curve per run: each its own colour
            style = dict(lw=1.8)
        ax.plot(grid, y, label=s["label"], drawstyle="steps-post", **style)
    ax.set_xlabel("L2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Certified accuracy (randomized smoothing)")
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- images
def _show(ax, img: np.ndarray, *, cmap: str = "gray") -> None:
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[0] == 1:
        ax.imshow(img[0], cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    elif img.ndim == 3:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")
    else:
        ax.imshow(img, cmap=cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_gradient_grid(result: dict, arrays: dict[str, np.ndarray], png: str | os.PathLike, *, image: int = 0) -> Path:
    """Paper Fig. 2: the noisy input and each model's loss gradient without / with adaptation, one
    column per noise level (gradients shown scaled, translated and clipped; see bnadapt.gradients)."""
    from bnadapt.gradients import display

    res, prm = result["results"], result["inputs"]["params"]
    sigmas, models = prm["sigmas"], res["models"]
    nrows = 1 + 2 * len(models)
    fig = _figure(1.5 * len(sigmas) + 1.6, 1.5 * nrows + 0.6)
    axes = fig.subplots(nrows, len(sigmas), squeeze=False)
    for j, s in enumerate(sigmas):
        _show(axes[0][j], arrays[f"noisy_s{j}"][image])
        axes[0][j].set_title(f"sigma = {s:g}", fontsize=9)
        for m_i, name in enumerate(models):
            for k, mode in enumerate(("standard", "adapted")):
                ax = axes[1 + 2 * m_i + k][j]
                _show(ax, display(arrays[f"grad_m{m_i}_s{j}_{mode}"][image]))
                row = next(r for r in res["rows"] if r["model"] == name and r["sigma"] == s and r["mode"] == mode)
                ax.set_xlabel(f"bg {100 * row['background_share'][image]:.0f}%", fontsize=7)
    axes[0][0].set_ylabel("input", fontsize=8)
    for m_i, name in enumerate(models):
        axes[1 + 2 * m_i][0].set_ylabel(f"{name}\nw/o adapt", fontsize=8)
        axes[2 + 2 * m_i][0].set_ylabel(f"{name}\n+ adaptive BN", fontsize=8)
    fig.suptitle("Loss gradients d loss / d x under Gaussian noise (bg: share on background pixels)", fontsize=10)
    return save_png(fig, png)


def plot_spectra(result: dict, arrays: dict[str, np.ndarray], png: str | os.PathLike) -> Path:
    """Paper Fig. 4: per corruption, an example, the Fourier spectrum of the corruption, and the spectra
    of the loss gradients without / with adaptation (log magnitude, centered: low frequencies middle)."""
    rows = result["results"]["rows"]
    names = [r["corruption"] for r in rows]
    fig = _figure(1.55 * len(names) + 1.4, 6.6)
    axes = fig.subplots(4, len(names), squeeze=False)
    labels = ["corrupted", "corruption\nspectrum", "gradient spectrum\nw/o adapt", "gradient spectrum\n+ adaptive BN"]
    for j, (name, r) in enumerate(zip(names, rows)):
        _show(axes[0][j], arrays[f"{name}/example"])
        axes[0][j].set_title(name.replace("_", " "), fontsize=7)
        for i, key in enumerate(("perturbation", "grad_standard", "grad_adapted")):
            _show(axes[i + 1][j], np.log1p(arrays[f"{name}/{key}"]), cmap="viridis")
        axes[1][j].set_xlabel(f"hf {100 * r['perturbation_hf_share']:.0f}%", fontsize=7)
        axes[2][j].set_xlabel(f"hf {100 * r['gradient_hf_share_standard']:.0f}%", fontsize=7)
        axes[3][j].set_xlabel(f"hf {100 * r['gradient_hf_share_adapted']:.0f}%", fontsize=7)
    for i, lab in enumerate(labels):
        axes[i][0].set_ylabel(lab, fontsize=8)
    fig.suptitle(f"Fourier spectra of corruptions and loss gradients ({result['results']['model']}; hf: energy "
                 "outside the central quarter band)", fontsize=9)
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- curves
def plot_sweep(result: dict, png: str | os.PathLike) -> Path:
    """Tables 4 / 5 as curves: accuracy (%) against rho or the test batch size, mean ± 2 sd, with the
    model without adaptation as a dashed line."""
    res, prm = result["results"], result["inputs"]["params"]
    over = res["over"]
    fig = _figure(5.8, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for row in res["rows"]:
        xs = [s["rho"] if over == "rho" else s["batch_size"] for s in row["settings"]]
        ys = np.array([100 * s["mean"] for s in row["settings"]])
        err = np.array([100 * s["two_sd"] for s in row["settings"]])
        line = ax.errorbar(xs, ys, yerr=err, marker="o", ms=3.5, lw=1.5, capsize=3, label=row["model"])
        ax.axhline(100 * row["no_adaptation"]["mean"], color=line[0].get_color(), ls="--", lw=1.0,
                   label=f"{row['model']} without adaptation")
    if over == "batch-size":
        ax.set_xscale("log", base=2)
        ax.set_xticks(prm["values"])
        ax.set_xticklabels([str(v) for v in prm["values"]])
        ax.set_xlabel("test batch size (rho = %g)" % prm["rho"])
    else:
        ax.set_xlabel(f"rho (test batch size {prm['batch_size']})")
    ax.set_ylabel(f"top-1 accuracy (%) at sigma = {prm['sigma']:g}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Accuracy under Gaussian noise vs {'rho' if over == 'rho' else 'test batch size'} "
                 f"(mean ± 2 sd, {prm['runs']} runs)", fontsize=10)
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- streams
def plot_stream(result: dict, png: str | os.PathLike, *, model: str | None = None, batch_size: int | None = None,
                title: str | None = None) -> Path:
    """Accuracy (%) along the stream for every method of a ``stream`` result at one model (default: the
    first) and batch size (default: the smallest): the mean over runs in consecutive segments, drawn as
    steps; the noise level (or, for a corrupted stream, the mean severity) of the first run's stream on
    a second axis when it varies."""
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
    sev = np.asarray(res.get("severity_curve") or [])
    sig = np.asarray(res["sigma_curve"])
    if sev.size and sev.max() > sev.min():  # a corrupted stream whose severity varies
        ax2 = ax.twinx()
        ax2.step(edges, np.append(sev, sev[-1]), where="post", color="0.5", lw=1.0, ls=":")
        ax2.set_ylabel("severity (run 1, dotted; 0 clean)")
        ax2.set_ylim(0, 5.5)
    elif sig.size and sig.max() > sig.min():
        ax2 = ax.twinx()
        ax2.step(edges, np.append(sig, sig[-1]), where="post", color="0.5", lw=1.0, ls=":")
        ax2.set_ylabel("noise sigma (run 1, dotted)")
        ax2.set_ylim(0, max(1e-6, sig.max()) * 1.1)
    ax.legend(fontsize=8, loc="lower right")
    st = prm["stream"]
    ax.set_title(title or f"{name}: online accuracy along the stream ({st['scenario']}), batch {b}, {prm['runs']} run(s)")
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- corruptions
def plot_corruption_heatmap(result: dict, png: str | os.PathLike) -> Path:
    """Table 8 as a heat map: accuracy (%) per corruption (rows, grouped as in the table) and severity
    (columns), for every model without and with adaptive BN (adapted: mean over runs)."""
    from bnadapt.corruptions.names import GROUPS

    res = result["results"]
    rows = res["rows"]
    present = set(rows[0]["accuracy"])
    names = [c for members in GROUPS.values() for c in members if c in present]
    panels = [(r["model"], "standard") for r in rows] + [(r["model"], "adapted") for r in rows
                                                          if r["accuracy"][names[0]]["adapted"] is not None]
    panels.sort(key=lambda p: ([r["model"] for r in rows].index(p[0]), p[1] != "standard"))
    fig = _figure(1.9 * len(panels) + 1.8, 0.24 * len(names) + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    im = None
    for ax, (model, key) in zip(axes, panels):
        row = next(r for r in rows if r["model"] == model)
        grid = np.array([[100 * cell["mean"] for cell in row["accuracy"][c][key]] for c in names])
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xticklabels([str(s) for s in range(1, grid.shape[1] + 1)], fontsize=7)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_title(f"{model}\n{'+ adaptive BN' if key == 'adapted' else 'w/o adaptation'}", fontsize=8)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([c.replace("_", " ") for c in names] if ax is axes[0] else [], fontsize=7)
    fig.colorbar(im, ax=list(axes), fraction=0.02, pad=0.01, label="top-1 accuracy (%)")
    prm = result["inputs"]["params"]
    fig.suptitle(f"Accuracy per corruption and severity ({prm['severity_params_label']})", fontsize=9)
    return save_png(fig, png)


# ----------------------------------------------------------------------------------------- poisoning
def plot_poison(result: dict, png: str | os.PathLike) -> Path:
    """Benign accuracy (%) against the poisoned fraction q of each batch, one panel per model: a line per
    (constraint, rho, batch size), q = 0 being the clean batch; dashed lines: the defenses immune to
    poisoning (no adaptation; adapt-then-freeze on trusted images)."""
    res, prm = result["results"], result["inputs"]["params"]
    models = list(dict.fromkeys(s["model"] for s in res["settings"]))
    fig = _figure(4.6 * len(models) + 0.6, 4.0)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    qs = [0.0] + list(prm["qs"])
    for ax, name in zip(axes, models):
        for st in (x for x in res["settings"] if x["model"] == name):
            ys = [st["clean"]["mean"]] + [(st["poisoned"].get(f"{q:g}") or {}).get("mean") for q in prm["qs"]]
            ls = "-" if st["constraint"] == "threat" else ":"
            ax.plot(qs, [100 * y if y is not None else np.nan for y in ys], marker="o", ms=3, ls=ls,
                    label=f"{st['constraint']}, rho {st['rho']:g}, batch {st['batch_size']}"
                    + (f", {st['robust']} statistics" if st.get("robust", "none") != "none" else ""))
        for ref in (r for r in res.get("references", []) if r["model"] == name):
            ax.axhline(100 * ref["no_adaptation"]["mean"], color="0.3", ls="--", lw=1, label="no adaptation")
            if ref.get("trusted_frozen"):
                ax.axhline(100 * ref["trusted_frozen"]["mean"], color="0.6", ls="--", lw=1,
                           label=f"frozen on {ref['trusted_images']} trusted images")
        ax.set_xlabel("poisoned fraction q of each batch")
        ax.set_ylabel("benign top-1 accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Batch poisoning: the attacker's images steer the statistics (solid: within the threat model; "
                 "dotted: anywhere in [0, 1])", fontsize=9)
    return save_png(fig, png)
