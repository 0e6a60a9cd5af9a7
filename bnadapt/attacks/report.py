"""Tables made from ``attack`` and ``poison`` result files (never stored in them): the layouts of the
paper's Table 2 and Table 7, plus one row per attack and the per-image worst case, each attack named."""

from __future__ import annotations

from bnadapt.tables import format_table, pct_cell

GRADIENT = {
    "pgd": "the model (eval mode)", "apgd-ce": "the model (eval mode)", "apgd-dlr": "the model (eval mode)",
    "apgd-t": "the model (eval mode)",
    "through": "the deployed per-batch model, through the batch statistics",
    "eot": "m frozen surrogates (adapted on randomly perturbed copies of the batch)",
    "transfer": "none (the no-adaptation attack's final batch)",
}


def _threat(t: dict) -> str:
    return t.get("constraint") or f"{'Linf' if t['threat_model'] == 'linf' else 'L2'} <= {t['eps']:g}"


def _diff(a: dict | None, b: dict | None) -> str:
    if not a or not b or a.get("mean") is None or b.get("mean") is None:
        return "n/a"
    return f"{100 * (a['mean'] - b['mean']):+.1f}"


def _kind(name: str) -> str:
    if name.startswith("eot-"):
        return GRADIENT["eot"]
    if name.startswith("transfer:"):
        return GRADIENT["transfer"]
    if name.endswith("-through-stats"):
        return GRADIENT["through"]
    return GRADIENT.get(name, "")


def format_attack_tables(result: dict) -> str:
    """Table 2 and (with several m) Table 7 layouts, then every attack and the worst cases, then the checks."""
    head, tables = attack_tables(result)
    out = [head]
    for title, header, rows in tables:
        out += ["", title, format_table(header, rows)]
    out += ["", format_checks(result["results"].get("checks", []))]
    return "\n".join(out)


def attack_tables(result: dict) -> tuple[str, list[tuple[str, list[str], list[list[str]]]]]:
    """(headline, [(title, header, rows)]) of :func:`format_attack_tables` (its checks aside)."""
    prm, res = result["inputs"]["params"], result["results"]
    p = prm["protocol"]
    n = result["inputs"]["data"]["n"]
    paper = prm.get("paper_attack")
    head = (f"Robust top-1 accuracy (%) under attack: {n} images, batch {p['batch_size']}, rho={p['rho']:g}, "
            f"{p['steps']} iterations, {p['restarts']} restart(s), mean ± 2 sd over {p['runs']} runs "
            "(each attack's final batch fed to the deployed model)")
    if not res.get("complete", True):
        head += f"  [INCOMPLETE: {res['units_done']}/{res['units']} batches" + \
                (f", shard {res['shard'][0]}/{res['shard'][1]}" if res.get("shard") else "") + "]"
    rows2, rows7, rows_all = [], [], []
    ms = [a for a in prm.get("adapted_attacks", []) if a.startswith("eot-pgd-m")]
    for m in res["models"]:
        thr = _threat(m["threat"])
        na, ad = m["no_adaptation"], m["adapted"]
        pgd = na["attacks"].get("pgd")
        pap = ad["attacks"].get(paper) if paper else None
        real = adapted_worst(ad)
        rows2.append([m["model"], thr, pct_cell(pgd), pct_cell(pap), _diff(pap, pgd), pct_cell(na["worst_case"]),
                      pct_cell(real), _diff(real, na["worst_case"]), pct_cell(ad["worst_case"]), _se(real)])
        if len(ms) > 1:
            rows7.append([m["model"], thr, pct_cell(pgd)] + [pct_cell(ad["attacks"].get(a)) for a in ms])
        for side, label, block in (("no_adaptation", "w/o adapt. BN", na), ("adapted", "adaptive BN", ad)):
            clean = m["clean"].get(side)
            if clean:
                rows_all.append([m["model"], label, "clean (no attack)", "-", pct_cell(clean), "", ""])
            for a, cell in block["attacks"].items():
                tag = f"no_adaptation/{a}" if side == "no_adaptation" else f"adapted/{a}"
                zero = m["zero_grad"].get(tag)
                secs = m["seconds"].get(tag)
                name = a + ("  [paper]" if a == paper else "")
                rows_all.append([m["model"], label, name, _kind(a), pct_cell(cell), "" if zero is None else str(zero),
                                 "" if secs is None else f"{secs:.1f}"])
            if block.get("worst_case"):
                what = ("WORST CASE (per image, all of the above)" if side == "no_adaptation" else
                        "UNION BOUND (per image, all of the above; not one batch)")
                rows_all.append([m["model"], label, what, "-", pct_cell(block["worst_case"]), "", ""])
            if side == "adapted" and block.get("realizable"):
                secs = m["seconds"].get("adapted/realizable")
                rows_all.append([m["model"], label, "REALIZABLE WORST CASE (one batch per deployment)",
                                 "the deployed model (assembled + refined)", pct_cell(block["realizable"]), "",
                                 "" if secs is None else f"{secs:.1f}"])
    tables = []
    title2 = (f"Paper Table 2 layout; [paper] = the paper's attack (PGD-{p['steps']} without adaptation, "
              f"{paper or 'EoT-PGD: not run'} with adaptation); [worst case] = the strongest honest number "
              "(with adaptation: one batch per deployment, judged as deployed; the union bound beside it counts an "
              "image robust only if no attack's batch fooled it):")
    header2 = ["model", "threat model", "w/o adapt. BN [PGD]", f"with adapt. BN [paper: {paper}]", "Diff",
               "w/o adapt. BN [worst case]", "with adapt. BN [worst case]", "Diff", "with adapt. BN [union bound]",
               "s.e. (worst case)"]
    keep = [i for i in range(len(header2))
            if (prm.get("adapted_attacks") or i not in (3, 4, 6, 7, 8, 9)) and (prm.get("no_adaptation_attacks") or
                                                                              i not in (2, 4, 5, 7))]
    tables.append((title2, [header2[i] for i in keep], [[r[i] for i in keep] for r in rows2]))
    if rows7:
        tables.append(("Paper Table 7 layout (EoT-PGD with m models):",
                       ["model", "threat model", "w/o adapt. BN [PGD]"] + [f"m={a.rsplit('m', 1)[1]}" for a in ms], rows7))
    tables.append(("Every attack (robust accuracy; zero-gradient images at the first step; seconds):",
                   ["model", "defense", "attack", "gradient through", "robust acc", "zero-grad", "s"], rows_all))
    return head, tables


def adapted_worst(block: dict) -> dict | None:
    """The adapted model's worst case to report: the realizable one (one batch per deployment, judged
    as deployed) where the result has it, else the per-image union bound (results made before it)."""
    return block.get("realizable") or block.get("worst_case")


def _se(cell: dict | None) -> str:
    """The standard error of a cell's mean over runs, in points ('' for one run or none)."""
    if not cell or len(cell.get("runs") or []) < 2:
        return ""
    import math
    import statistics

    return f"{100 * statistics.stdev(cell['runs']) / math.sqrt(len(cell['runs'])):.2f}"


def format_checks(records: list[dict]) -> str:
    warn = [r for r in records if r["warning"]]
    if not warn:
        return f"sanity checks: none of {len(records)} warns"
    return "\n".join(f"WARNING [{r['check']}{', ' + r['model'] if r.get('model') else ''}]: {r['message']}"
                     for r in warn)


def format_poison_table(result: dict) -> str:
    """Benign accuracy against the poisoned fraction q, per model, constraint, robust statistic, rho and
    batch size."""
    head, tables = poison_tables(result)
    out = []
    for i, (title, header, rows) in enumerate(tables):
        out += ([head] if i == 0 else ["", title]) + [format_table(header, rows)]
    return "\n".join(out)


def poison_tables(result: dict) -> tuple[str, list[tuple[str, list[str], list[list[str]]]]]:
    """(headline, [(title, header, rows)]) of :func:`format_poison_table`. A robust-statistics column
    appears when some setting used robust statistics (files made before the option have none), with a
    table of the two craftings (through the robust statistics; transferred from the plain ones)."""
    prm, res = result["inputs"]["params"], result["results"]
    qs = prm["qs"]
    settings = res["settings"]
    robust_col = any(s.get("robust", "none") != "none" for s in settings)
    poisoner = ""
    if "schedule" in prm:
        poisoner = (f" ({prm['loss']} loss, {prm['schedule']} step from {prm['step_rule'].split(',')[0]}, "
                    f"{prm['start']} start, {prm['restarts']} restart(s))")
    head = (f"Benign top-1 accuracy (%) under batch poisoning (the attacker controls a fraction q of each test batch "
            f"and maximizes the error on the other images through the shared statistics): "
            f"{result['inputs']['data']['n']} images, {prm['steps']} iterations{poisoner}, mean ± 2 sd over "
            f"{prm['runs']} runs")
    rows = []

    def cell(s, q, what="poisoned"):
        c, d = (s.get(what) or {}).get(f"{q:g}"), (s.get("drop") or {}).get(f"{q:g}")
        if what != "poisoned":
            return pct_cell(c) if c else "-"
        return pct_cell(c) + ("" if not d else f" ({-100 * d['mean'] + 0.0:+.1f})")

    for s in settings:
        rows.append([s["model"], s["constraint"]] + ([s.get("robust", "none")] if robust_col else [])
                    + [f"{s['rho']:g}", str(s["batch_size"]), pct_cell(s["clean"])] + [cell(s, q) for q in qs])
    head += "; (change) = poisoned minus clean accuracy of the same benign images, in points"
    if robust_col:
        head += ("; robust rows: the worse for the defender of the poison crafted through the robust statistics "
                 "and the one crafted against the plain statistics and transferred")
    tables = [("", ["model", "poison constraint"] + (["statistics"] if robust_col else [])
               + ["rho", "batch", "q=0 (clean)"] + [f"q={q:g}" for q in qs], rows)]
    both = [s for s in settings if s.get("direct")]
    if both:
        tables.append(("Robust statistics, each crafting alone (benign accuracy %; through the robust statistics / "
                       "transferred from the plain ones; batches where the transfer was worse for the defender):",
                       ["model", "poison constraint", "statistics", "rho", "batch"] + [f"q={q:g}" for q in qs],
                       [[s["model"], s["constraint"], s["robust"], f"{s['rho']:g}", str(s["batch_size"])]
                        + [f"{cell(s, q, 'direct')} / {cell(s, q, 'transfer')} "
                           f"({s['transfer_won'][f'{q:g}']}/{s['batches']})" for q in qs] for s in both]))
    ref = []
    for m in res.get("references", []):
        ref.append([m["model"], "no adaptation (rho=0)", pct_cell(m["no_adaptation"])])
        if m.get("trusted_frozen"):
            ref.append([m["model"], f"adapt-then-freeze on {m['trusted_images']} trusted images (rho=1)",
                        pct_cell(m["trusted_frozen"])])
    if ref:
        tables.append(("Immune to poisoning (per-image models; their accuracy does not depend on the batch):",
                       ["model", "defense", "accuracy"], ref))
    return head, tables
