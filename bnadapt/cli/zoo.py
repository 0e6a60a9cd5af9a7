"""``bnadapt zoo``: the shipped models and their measured metrics."""

from __future__ import annotations

import json

from bnadapt.cli import options as opt


def zoo_entries() -> list[dict]:
    from bnadapt.models import ZOO_DIR, zoo_names

    entries = []
    for name in zoo_names():
        path = ZOO_DIR / f"{name}.safetensors"
        card = json.loads(path.with_suffix(".json").read_text())
        entries.append({"name": name, "path": str(path), "bytes": path.stat().st_size,
                        "recipe": (card.get("recipe") or {}).get("name"),
                        "threat_model": (card.get("recipe") or {}).get("threat_model"),
                        "eps": (card.get("recipe") or {}).get("eps"),
                        "metrics": card.get("metrics", {}),
                        "robust_metrics": {k: v for k, v in (card.get("robust_metrics") or {}).items()
                                           if isinstance(v, dict) and "value" in v},
                        "robust_protocol": (card.get("robust_metrics") or {}).get("protocol"),
                        "metric_names": {k: v for k, v in (card.get("metrics_protocol") or {}).items()
                                         if k in card.get("metrics", {})}})
    return entries


def metrics_cell(entry: dict) -> str:
    """A model's card metrics (``pgd_acc`` is PGD-20) and, when measured, its robust metrics beside them
    (stronger attacks, each named: ``scripts/zoo_robust.py``)."""
    cell = ", ".join(f"{k} {100 * v:.1f}%" + (" (PGD-20)" if k == "pgd_acc" else "")
                     for k, v in entry["metrics"].items())
    robust = entry.get("robust_metrics") or {}
    if robust:
        cell += "; stronger attacks: " + ", ".join(f"{k} {100 * v['value']:.1f}%" for k, v in robust.items())
    return cell


def cmd_zoo(args) -> int:
    from bnadapt.tables import format_table

    entries = zoo_entries()
    if args.json:
        opt.say(json.dumps(entries, indent=2))
        return 0
    if not entries:
        opt.say("the zoo is empty")
        return 0
    rows = []
    for e in entries:
        threat = f"{e['threat_model']} eps {e['eps']:g}" if e["threat_model"] else "-"
        rows.append([e["name"], str(e["recipe"]), threat, f"{e['bytes'] / 1e6:.2f} MB", metrics_cell(e)])
    opt.say(format_table(["name", "recipe", "trained against", "size", "metrics (10,000 test images; attacks at "
                                                                     "the model's own threat model)"], rows))
    if any(e["robust_metrics"] for e in entries):
        opt.say("stronger attacks (no adaptation, eval mode): pgd100_acc = PGD-100 with restarts, apgd_ce_acc / "
                "apgd_dlr_acc = APGD (Croce & Hein 2020), worst_case_acc = per image over all of them; "
                "measured by scripts/zoo_robust.py")
    opt.say("use any of them as --model zoo:NAME; `bnadapt zoo --json` gives each metric's protocol")
    return 0


def register(sub) -> None:
    p = sub.add_parser("zoo", help="list the shipped models and their metrics")
    p.add_argument("--json", action="store_true", help="print a JSON list (name, path, bytes, metrics and their protocols)")
    p.set_defaults(func=cmd_zoo)
