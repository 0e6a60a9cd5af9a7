"""Tables made from a ``corruption_eval`` result (dict form): the layouts of the paper's Table 3 and
Table 8, and RobustBench's unaggregated corruption CSV. Nothing here computes a number."""

from __future__ import annotations

import csv
import io

from bnadapt.corruptions.names import GROUPS, SEVERITIES
from bnadapt.tables import format_table, markdown_table

GROUP_TITLES = {"noise": "Noise", "blur": "Blur", "weather": "Weather", "digital": "Digital", "hold-out": "Hold-out"}


def _pct(cell, digits: int = 1) -> str:
    if cell is None:
        return "n/a"
    if cell.get("runs") and len(cell["runs"]) > 1:
        return f"{100 * cell['mean']:.{digits}f} ± {100 * cell['two_sd']:.2f}"
    return f"{100 * cell['mean']:.{digits}f}"


def _headline(result: dict, what: str) -> str:
    prm, data = result["inputs"]["params"], result["inputs"]["data"]
    ref = prm.get("reference")
    ref_txt = f"mCE reference: {ref['name']}" if ref else "no mCE reference (mCE n/a; pass --reference)"
    return (f"{what}; {prm['severity_params_label']}; {data['n']} images per set, batch {prm['batch_size']}, "
            f"rho={prm['rho']:g}, adapted: mean ± 2 sd over {prm['runs']} runs; {ref_txt}")


def format_table3(result: dict, markdown: bool = False) -> str:
    """Table 3: clean, corrupt and gap without and with adaptive BN, then mCE and relative mCE (%)."""
    head, header, rows, notes = table3(result)
    table = markdown_table(header, rows) if markdown else format_table(header, rows)
    return "\n".join([head, table] + notes)


def _corrupt_over(result: dict) -> str:
    """What 'corrupt' averages in this result: the 15 ImageNet-C corruptions, or those of them present."""
    from bnadapt.corruptions.names import COMMON

    missing = set()
    for r in result["results"]["rows"]:
        for m in (r["metrics"]["standard"], r["metrics"]["adapted"] or {}):
            missing |= set(m.get("missing") or [])
    if not missing:
        return f"mean over the {len(COMMON)} ImageNet-C corruptions"
    n = len(COMMON) - len(missing)
    return f"mean over the {n} of the {len(COMMON)} ImageNet-C corruptions evaluated"


def table3(result: dict) -> tuple[str, list[str], list[list[str]], list[str]]:
    """(headline, header, rows, notes) of Table 3 (see :func:`format_table3`)."""
    header = ["model", "clean", "corrupt", "gap", "clean (BN)", "corrupt (BN)", "gap (BN)", "mCE", "mCE (BN)",
              "rel. mCE", "rel. mCE (BN)"]
    rows, notes = [], set()
    for r in result["results"]["rows"]:
        s, a = r["metrics"]["standard"], r["metrics"]["adapted"] or {}
        rows.append([r["model"], _pct(s["clean"]), _pct(s["corrupt"]), _pct(s["gap"]), _pct(a.get("clean")),
                     _pct(a.get("corrupt")), _pct(a.get("gap")), _pct(s["mce"]), _pct(a.get("mce")),
                     _pct(s["relative_mce"]), _pct(a.get("relative_mce"))])
        for m in (s, a):
            if m.get("relative_excluded"):
                notes.add(f"relative mCE leaves out {', '.join(m['relative_excluded'])} (reference error not above "
                          "its clean error)")
            if m.get("missing"):
                notes.add(f"mCE n/a: not evaluated: {', '.join(m['missing'])}")
    head = _headline(result, f"Top-1 accuracy (%), corrupt = {_corrupt_over(result)} x 5 severities; "
                             "(BN) = with adaptive BN")
    return head, header, rows, sorted(notes)


def format_table8(result: dict, markdown: bool = False) -> str:
    """Table 8: accuracy per corruption (mean over severities), grouped, with group averages; the
    reference's accuracy (1 - its error) in the first column."""
    head, header, rows = table8(result)
    return head + "\n" + (markdown_table(header, rows) if markdown else format_table(header, rows))


def table8(result: dict) -> tuple[str, list[str], list[list[str]]]:
    """(headline, header, rows) of Table 8 (see :func:`format_table8`)."""
    res = result["results"]
    ref = res.get("reference")
    models = res["rows"]
    header = ["group", "corruption", f"{ref['name']} (ref.)" if ref else "reference"]
    for r in models:
        header += [r["model"], f"{r['model']} (BN)"]
    ref_err = (ref or {}).get("errors") or {}

    def ref_cell(c):
        return f"{100 * (1 - ref_err[c]):.1f}" if c in ref_err else "n/a"

    rows = [["Clean", "-", f"{100 * (1 - ref['clean_error']):.1f}" if ref and ref.get("clean_error") is not None
             else "n/a"] + [x for r in models for x in (_pct(r["metrics"]["standard"]["clean"]),
                                                        _pct((r["metrics"]["adapted"] or {}).get("clean")))]]
    present = set(models[0]["accuracy"])
    for g, members in GROUPS.items():
        mine = [c for c in members if c in present]
        if not mine:
            continue
        for i, c in enumerate(mine):
            row = [GROUP_TITLES[g] if i == 0 else "", c, ref_cell(c)]
            for r in models:
                row += [_pct(r["metrics"]["standard"]["per_corruption"][c]),
                        _pct(((r["metrics"]["adapted"] or {}).get("per_corruption") or {}).get(c))]
            rows.append(row)
        avg = ["", "average", f"{100 * sum(1 - ref_err[c] for c in mine) / len(mine):.1f}"
               if all(c in ref_err for c in mine) else "n/a"]
        for r in models:
            for key in ("standard", "adapted"):
                m = r["metrics"][key]
                avg.append("n/a" if m is None else
                           f"{100 * sum(m['per_corruption'][c]['mean'] for c in mine) / len(mine):.1f}")
        rows.append(avg)
    head = _headline(result, "Top-1 accuracy (%) per corruption, mean over severities 1-5; (BN) = with adaptive BN")
    return head, header, rows


def robustbench_csv(result: dict) -> str:
    """RobustBench's unaggregated layout: two header rows (corruption, severity 1-5), one row per
    model (accuracies as fractions): ``<model>`` without adaptation, ``<model>+adaptive-bn`` with it
    (mean over runs), and the reference model's row when its per-severity errors are known (AlexNet's
    published table has only means, so it has no row). The first header cell names the severity
    parameter table."""
    res, prm = result["results"], result["inputs"]["params"]
    names = prm["corruptions"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([f"params={prm['severity_params'] or 'unknown'}"] + [c for c in names for _ in SEVERITIES])
    w.writerow([""] + [str(s) for _ in names for s in SEVERITIES])
    ref = res.get("reference")
    if ref and ref.get("per_severity"):
        w.writerow([f"{ref['name']} (reference)"] + [repr(1 - e) for c in names for e in ref["per_severity"][c]])
    for r in res["rows"]:
        w.writerow([r["model"]] + [repr(x["mean"]) for c in names for x in r["accuracy"][c]["standard"]])
        if r["accuracy"][names[0]]["adapted"] is not None:
            w.writerow([f"{r['model']}+adaptive-bn"] + [repr(x["mean"]) for c in names
                                                        for x in r["accuracy"][c]["adapted"]])
    return buf.getvalue()
