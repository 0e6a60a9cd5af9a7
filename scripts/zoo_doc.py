"""Write docs/zoo.md (recipe, epochs, wall time, size, metrics, floors) from the zoo's model cards,
re-measuring on the 10,000 Fashion-MNIST test images: clean accuracy always, every card metric
(noise and PGD-20 accuracy, a few minutes) with --full. Fails when a re-measured metric differs
from its card by more than 0.2 points.

    .venv/bin/python scripts/zoo_doc.py [--full]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from bnadapt.data import load_fashion_mnist
from bnadapt.models import ZOO_DIR, load_model, zoo_names
from bnadapt.tables import format_table
from bnadapt.card import clean_accuracy, evaluate_card

FULL = "--full" in sys.argv

FLOORS = {
    "baseline": {"clean_acc": 0.92},
    "gaussian-0.5": {"clean_acc": 0.85, "noise_acc_0.5": 0.83},
    "adv-linf-0.1": {"clean_acc": 0.85, "pgd_acc": 0.75},
    "adv-l2-1.5": {"clean_acc": 0.84, "pgd_acc": 0.65},
}


def first_run_table() -> str:
    rows = []
    for p in sorted(Path("docs/zoo_first_run").glob("*.json")):
        c = json.loads(p.read_text())
        rows.append([p.name.split(".crop")[0], str(c["recipe"]["epochs"]),
                     ", ".join(f"{k} {100 * v:.2f}%" for k, v in c["metrics"].items())])
    return format_table(["model", "epochs", "metrics (10,000 test images)"], rows)


def main() -> int:
    rows, details, bad = [], [], []
    total_wall = 0.0
    for name in zoo_names():
        loaded = load_model(f"zoo:{name}")
        card = loaded.card
        if FULL:
            measured = evaluate_card(loaded)
        else:
            ds = load_fashion_mnist("test")
            measured = dict(card["metrics"], clean_acc=clean_accuracy(loaded.model, ds, np.arange(len(ds))))
        for k, v in measured.items():
            if abs(v - card["metrics"].get(k, -1)) > 0.002:
                bad.append(f"{name}: {k} card {card['metrics'].get(k)} vs measured {v}")
        r, t = card["recipe"], card.get("training", {})
        wall = float(t.get("wall_time_s", t.get("wall_s", 0)) or 0)
        total_wall += wall
        floors = FLOORS.get(name, {})
        mets = ", ".join(
            f"{k} {100 * v:.2f}%" + (f" (floor {100 * floors[k]:.0f}%)" if k in floors else "")
            for k, v in measured.items())
        robust = {k: v for k, v in (card.get("robust_metrics") or {}).items() if isinstance(v, dict) and "value" in v}
        if robust:  # stronger attacks than the card's PGD-20 (scripts/zoo_robust.py), each named
            mets += "; stronger attacks: " + ", ".join(f"{k} {100 * v['value']:.2f}%" for k, v in robust.items())
        met = all(measured.get(k, 0) >= f for k, f in floors.items())
        rows.append([name, r["name"], str(r.get("epochs")), str(r.get("best_epoch")), f"{wall / 60:.1f}",
                     f"{(ZOO_DIR / f'{name}.safetensors').stat().st_size / 1e6:.2f}", mets, "yes" if met else "NO"])
        robust_text = ""
        if robust:
            robust_text = "".join(f"\n- `{k}` {100 * v['value']:.2f}%: {v['attack']}" for k, v in robust.items())
            robust_text = (f"\nRobust metrics (stronger attacks than PGD-20, by `scripts/zoo_robust.py`):{robust_text}\n\n"
                           f"Robust metric protocol: `{json.dumps(card['robust_metrics'].get('protocol'), sort_keys=True)}`\n")
        details.append(f"### {name}\n\nRecipe: `{json.dumps(r, sort_keys=True)}`\n\n"
                       f"Metric protocol: `{json.dumps(card.get('metrics_protocol'), sort_keys=True)}`\n{robust_text}")
    table = format_table(["model", "recipe", "epochs", "best epoch", "train min", "MB", "metrics (10,000 test images)", "floors met"], rows)
    text = f"""# The Fashion-MNIST zoo

Four pre-activation ResNets (depth 2, widths 16/32/64, stride-2 stem, ~175k parameters; pixels in
[0, 1], normalization inside the model), trained on this 2-core CPU by `scripts/train_zoo.sh`
(exact recipes, seeds and epochs inside it; every run resumable). The metrics below were measured
by `bnadapt train` at the end of training (written in each card); `scripts/zoo_doc.py`, which wrote
this page, re-measured {"every metric" if FULL else "the clean accuracy"} from the shipped files and
found it equal to the card's to within 0.2 points.

Total training wall time of the shipped models: {total_wall / 60:.1f} min (measured by `bnadapt train`; other
jobs shared the 2 cores during parts of the adv-l2-1.5 and adv-linf-0.1 runs, so a quiet machine is faster:
about 105 s per PGD-7 epoch and 16 s per standard epoch).

```
{table}
```

Metric protocols: `clean_acc` on the 10,000 test images in eval mode; `noise_acc_0.5` under one draw of
N(0, 0.5^2) pixel noise (fixed seed); `pgd_acc` under PGD with random start, 20 steps (Linf: eps 0.1,
step 0.01; L2: eps 1.5, step 2.5*eps/20), eval mode, fixed seed. Where a card has them, the stronger
attacks of `scripts/zoo_robust.py` follow (no adaptation, eval mode, the model's own threat model):
`pgd100_acc` (PGD-100, step eps/4, restarts, best iterate per image), `apgd_ce_acc` and `apgd_dlr_acc`
(APGD, Croce & Hein 2020) and `worst_case_acc` (an image counts only if it survives every one of them);
PGD-20 over-credits these models, most of all the L2 one (its step 2.5*eps/20 is too small).

## A first run with crop + flip augmentation

The first full run of `scripts/train_zoo.sh` trained all four models with random-crop (pad 2) + flip
augmentation (15/15/10/15 epochs). The three robust models missed their clean-accuracy floors in these
short schedules, so they were retrained without augmentation (the recipes above). Their cards are kept
in `docs/zoo_first_run/`:

```
{first_run_table()}
```

{chr(10).join(details)}
"""
    Path("docs/zoo.md").write_text(text)
    print(table)
    if bad:
        print("MISMATCH:\n" + "\n".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
