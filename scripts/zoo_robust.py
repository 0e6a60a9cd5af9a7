"""Re-measure the robust accuracy of the zoo's adversarially trained models with stronger attacks than
the cards' PGD-20 and write it into each card as ``robust_metrics`` (the .safetensors are untouched).

Each model is attacked at its own training threat model (adv-linf-0.1: Linf eps 0.1; adv-l2-1.5: L2
eps 1.5), without adaptation (eval mode), by ``bnadapt.attacks.evaluate.attack_table`` with
PGD-100 (step eps/4, best iterates, ``--restarts`` random restarts), APGD-CE and APGD-DLR (Croce & Hein
2020; same restarts); ``worst_case_acc`` counts an image robust only if it is classified correctly clean
and after every attack. Each number is stored with its attack and protocol. Rows are resumable
(``--out-dir``/zoo_robust_<name>.rows.jsonl; rerun the same command to continue).

    # full run (the lead's; 10,000 test images): writes bnadapt/zoo/<name>.json
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python scripts/zoo_robust.py --out-dir results/zoo_robust
    # proof that it works (writes to a copy of the cards; never commit cards from a tiny run)
    PYTHONPATH=. .venv/bin/python scripts/zoo_robust.py --images 200 --card-dir /tmp/cards --out-dir /tmp/zr
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bnadapt.attacks.evaluate import Protocol, attack_table
from bnadapt.attacks.report import format_attack_tables
from bnadapt.data import select
from bnadapt.models import ZOO_DIR, load_model
from bnadapt.results import utc_now, write_json
from bnadapt.runs import resolve_device, set_threads

ADVERSARIAL = ("adv-linf-0.1", "adv-l2-1.5")


def robust_metrics(result: dict, *, command: str) -> dict:
    """The card entry: each attack's robust accuracy, named with its attack, and the protocol."""
    prm, res = result["inputs"]["params"], result["results"]
    m = res["models"][0]
    p = prm["protocol"]
    attacks = {a.split(":", 1)[1]: d for a, d in prm["attacks"].items()}
    names = {"pgd": f"pgd{p['steps']}_acc", "apgd-ce": "apgd_ce_acc", "apgd-dlr": "apgd_dlr_acc"}
    words = {"pgd": f"PGD-{p['steps']}, step eps/4, uniform random start, {p['restarts']} restart(s), best iterate per "
                    "image", "apgd-ce": f"APGD-CE (Croce & Hein 2020), {p['steps']} iterations, {p['restarts']} "
                                        "restart(s)",
             "apgd-dlr": f"APGD-DLR (Croce & Hein 2020), {p['steps']} iterations, {p['restarts']} restart(s)"}
    out = {}
    for a, cell in m["no_adaptation"]["attacks"].items():
        out[names[a]] = {"value": cell["mean"], "attack": words[a], "settings": attacks[a]}
    out["worst_case_acc"] = {"value": m["no_adaptation"]["worst_case"]["mean"],
                             "attack": "per image: correct clean and after every attack above"}
    data = result["inputs"]["data"]
    out["protocol"] = {"test_set": data["name"], "images": data["n"], "subset": "all images" if data["images"] is None
                       else f"{data['n']} images (subset seed {data['subset_seed']})",
                       "threat": m["threat"], "mode": "eval mode (BN running statistics), no adaptation",
                       "batch_size": p["batch_size"], "seed": result["inputs"]["seed"], "clean_acc":
                       m["clean"]["no_adaptation"]["mean"], "command": command, "created_utc": utc_now(),
                       "bnadapt": result["versions"]["bnadapt"], "torch": result["versions"]["torch"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ADVERSARIAL))
    ap.add_argument("--images", type=int, default=None, help="subset size (default: the full test set)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--card-dir", default=str(ZOO_DIR), help="where the cards are written (default: the zoo)")
    ap.add_argument("--out-dir", default="results/zoo_robust", help="row files and result files")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    set_threads(args.threads)
    dev = resolve_device(args.device)
    card_dir, out_dir = Path(args.card_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["scripts/zoo_robust.py"] + sys.argv[1:])
    protocol = Protocol(rho=0.0, batch_size=args.batch_size, runs=1, steps=args.steps, restarts=args.restarts,
                        plain=("pgd", "apgd-ce", "apgd-dlr"), adapted=())
    for name in args.models.split(","):
        loaded = load_model(f"zoo:{name}")
        sel = select("fashion-mnist", "test", images=args.images, subset_seed=args.seed)
        rows = out_dir / f"zoo_robust_{name}.rows.jsonl"
        res = attack_table([loaded], sel, rows, protocol=protocol, seed=args.seed, device=dev, resume=True,
                           quiet=args.quiet)
        d = res.as_dict()
        res.write(out_dir / f"zoo_robust_{name}.json")
        print(format_attack_tables(d))
        card_path = card_dir / f"{name}.json"
        if not card_path.exists():
            shutil.copy(ZOO_DIR / f"{name}.json", card_path)
        card = json.loads(card_path.read_text())
        card["robust_metrics"] = robust_metrics(d, command=command)
        write_json(card_path, card)
        pgd20 = card.get("metrics", {}).get("pgd_acc")
        rm = card["robust_metrics"]
        print(f"{name}: card PGD-20 {100 * pgd20:.2f}% | " + ", ".join(
            f"{k} {100 * v['value']:.2f}%" for k, v in rm.items() if k != "protocol") + f"; wrote {card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
