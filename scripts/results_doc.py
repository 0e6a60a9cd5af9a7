"""Assemble docs/results.md from the main job's result files (results/*.json), never from captured output.

    bash scripts/main.sh && .venv/bin/python scripts/results_doc.py

Every table is formatted from a result file that `bnadapt` wrote (bnadapt-result/1); each section
prints the exact command line recorded in that file (its `run.argv`).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from bnadapt.certify import format_certify_table
from bnadapt.noise import format_noise_table, format_sweep
from bnadapt.results import read_result

R = Path("results")
SECTIONS = [
    ("Table 1: accuracy under Gaussian noise, with and without adaptive BN", "table1_noise.json", format_noise_table),
    ("Table 4: rho sweep (sigma 0.5)", "table4_rho.json", format_sweep),
    ("Table 5: test batch-size sweep (rho 1, sigma 0.5)", "table5_batch.json", format_sweep),
    ("Fig. 3 / Table 6: certified accuracy of adv-l2-1.5 + adaptive BN at three sigmas", "certify_adv-l2_adapt.json",
     format_certify_table),
    ("Fig. 1 comparison row: adv-l2-1.5 without adaptation (sigma 0.25)", "certify_adv-l2_noadapt.json",
     format_certify_table),
    ("Fig. 1 comparison row: gaussian-0.5 (Cohen et al.'s smoothing model, sigma 0.5)", "certify_gaussian-0.5.json",
     format_certify_table),
]


def command(d: dict) -> str:
    argv = list(d["run"].get("argv") or [])
    if argv:
        argv[0] = "bnadapt"
    return " ".join(shlex.quote(a) for a in argv)


def main() -> None:
    parts = ["# Results on the shipped Fashion-MNIST models\n",
             "Made by `bash scripts/main.sh` (the README's main job) and assembled by `scripts/results_doc.py` "
             "from the result files it wrote in `results/`. Percentages; mean ± 2 sample sd over runs. "
             "Each table is printed with the exact command that made it. Protocols: `docs/protocols.md`.\n"]
    Path("docs/img").mkdir(parents=True, exist_ok=True)
    for title, name, fmt in SECTIONS:
        path = R / name
        if not path.exists():
            parts.append(f"## {title}\n\n(not run: {path} missing)\n")
            continue
        d = read_result(path)
        png = path.with_suffix(".png")
        plot = ""
        if png.exists():
            shutil.copyfile(png, Path("docs/img") / png.name)
            plot = f"\n![{title}](img/{png.name})\n"
        parts.append(f"## {title}\n\nCommand: `{command(d)}` (wall time {d['run']['wall_s']:.0f} s)\n\n"
                     f"```\n{fmt(d)}\n```\n{plot}")
    fig1 = R / "fig1_certified.png"
    if fig1.exists():
        shutil.copyfile(fig1, Path("docs/img") / fig1.name)
        parts.append("## Fig. 1: the certification runs overlaid\n\n"
                     "Command: `bnadapt plot-certified results/certify_*.json --out results/fig1_certified.png` "
                     "(a multi-sigma run contributes its envelope of curves).\n\n![Fig. 1](img/fig1_certified.png)\n")
    Path("docs/results.md").write_text("\n".join(parts))
    print("wrote docs/results.md")


if __name__ == "__main__":
    main()
