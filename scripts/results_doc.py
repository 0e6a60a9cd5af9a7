"""Assemble docs/results.md from the main job's result files (results/*.txt, *.json).

    bash scripts/main.sh && .venv/bin/python scripts/results_doc.py

Every table is copied from a file that `bnadapt` wrote; the JSON files beside them hold the raw runs,
model hashes, data, seeds and library versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

R = Path("results")

SECTIONS = [
    ("Table 1: accuracy under Gaussian noise, with and without adaptive BN", "table1_noise",
     "`bnadapt noise --model zoo:baseline --model zoo:gaussian-0.5 --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --runs 5`"),
    ("Table 4: rho sweep (batch 512, sigma 0.5)", "table4_rho",
     "`bnadapt sweep rho --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --runs 5`"),
    ("Table 5: test batch-size sweep (rho 1, sigma 0.5)", "table5_batch",
     "`bnadapt sweep batch-size --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --runs 5`"),
    ("Fig. 3 / Table 6: certified accuracy of adv-l2-1.5 + adaptive BN at three sigmas", "certify_adv-l2_adapt",
     "`bnadapt certify --model zoo:adv-l2-1.5 --adapt --sigmas 0.25,0.5,0.75 --images 100 --per-class 10 --samples 10000`"),
    ("Fig. 1 comparison row: adv-l2-1.5 without adaptation (sigma 0.25)", "certify_adv-l2_noadapt",
     "`bnadapt certify --model zoo:adv-l2-1.5 --sigmas 0.25 --images 100 --per-class 10 --samples 10000`"),
    ("Fig. 1 comparison row: gaussian-0.5 (Cohen et al.'s smoothing model, sigma 0.5)", "certify_gaussian-0.5",
     "`bnadapt certify --model zoo:gaussian-0.5 --sigmas 0.5 --images 100 --per-class 10 --samples 10000`"),
]


def main() -> None:
    parts = ["# Results on the shipped Fashion-MNIST models\n",
             "Made by `bash scripts/main.sh` (the README's main job) and assembled by "
             "`scripts/results_doc.py` from the files it wrote in `results/`. Fashion-MNIST test set "
             "(10,000 images) unless said otherwise; percentages; mean ± 2 sample sd over runs. "
             "Protocols: `docs/protocols.md`.\n"]
    for title, stem, cmd in SECTIONS:
        txt = R / f"{stem}.txt"
        if not txt.exists():
            parts.append(f"## {title}\n\n(not run: {txt} missing)\n")
            continue
        body = "\n".join(l for l in txt.read_text().splitlines() if not l.startswith("wrote "))
        meta = "\n\n"
        js = R / f"{stem}.json"
        if js.exists():
            d = json.loads(js.read_text())
            prm = d.get("params") or {}
            if "runs" in prm:
                meta += (f"Measured with runs={prm['runs']}, images={d['data']['n']}, seed={prm['seed']}, "
                         f"wall time {d['provenance'].get('wall_s', '?')} s.\n")
            elif "n" in prm:
                meta += (f"Measured with images={d['num_images']}, sigmas={d['sigmas']}, n0={prm['n0']}, "
                         f"n={prm['n']}, alpha={prm['alpha']}, adaptation={(prm.get('extra') or {}).get('adapt')}, "
                         f"mean time per image and sigma {d['mean_time_s']:.2f} s.\n")
        png = R / f"{stem}.png"
        plot = ""
        if png.exists():
            Path("docs/img").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, Path("docs/img") / png.name)
            plot = f"![{title}](img/{png.name})\n"
        parts.append(f"## {title}\n\nCommand (sizes as in the line below the table): {cmd}\n\n```\n{body}\n```{meta}{plot}")
    fig1 = R / "fig1_certified.png"
    if fig1.exists():
        Path("docs/img").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fig1, Path("docs/img") / fig1.name)
        parts.append("## Fig. 1: the three certification runs overlaid\n\n"
                     "Command: `bnadapt plot-certified results/certify_*.json --out results/fig1_certified.png` "
                     "(multi-sigma runs contribute their Bonferroni envelope).\n\n![Fig. 1](img/fig1_certified.png)\n")
    Path("docs/results.md").write_text("\n".join(parts))
    print("wrote docs/results.md")


if __name__ == "__main__":
    main()
