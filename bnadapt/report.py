"""``bnadapt report DIR``: report.md and a self-contained report.html from the result files in DIR.

Every table is built from result files (never from captured output), each with the parameters that
made it and the command that did (for a ``bnadapt reproduce`` stage: the stage, the reproduce call and
the standalone command(s) giving the same result, from the file's ``run`` block); every figure is drawn
by :mod:`bnadapt.viz` from result files and embedded in the HTML as a data URI (the page opens offline
and makes no request). The report opens with the paper's claims, each beside what this run measured
(:mod:`bnadapt.claims`).

The content is a list of blocks (heading, text, table, figure, code; :mod:`bnadapt.markup`) rendered twice:
Markdown and HTML.
"""

from __future__ import annotations

import json
from pathlib import Path

from bnadapt.errors import BnadaptError, check
from bnadapt.markup import Block, to_html, to_markdown  # noqa: F401  (Block and to_html importable from here)
from bnadapt.results import FORMAT, atomic_write_text, locate, read_result
from bnadapt.tables import pct, pct_cell


# ----------------------------------------------------------------------------------------- loading
def load_results(folder: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Result files under ``folder`` grouped by experiment (files of other formats are ignored; when a
    reproduce manifest exists only the files it lists are used)."""
    folder = Path(folder)
    manifest = folder / "reproduce.json"
    paths: list[Path]
    if manifest.exists():
        man = read_result(manifest, "reproduce")
        paths = [locate(folder, s["file"]) for s in man["results"]["stages"]] + [manifest]
    else:
        paths = sorted(p for p in folder.rglob("*.json") if not p.name.endswith(".params.json"))
    out: dict[str, list[tuple[Path, dict]]] = {}
    for p in paths:
        if not p.exists():
            continue
        try:
            head = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            continue
        d = read_result(p)
        out.setdefault(d["experiment"], []).append((p, d))
    return out


# ----------------------------------------------------------------------------------------- helpers
def data_phrase(data: dict) -> str:
    """The images a result was measured on, in words: ``N images of NAME`` for ordinary data; for a
    corrupted set (corruption results, spectra, reference tables) the set and the data it was made from."""
    if not data:
        return ""
    if "set" in data:
        st = data.get("set") or {}
        made = (((st.get("manifest_identity") or {}).get("source") or {}).get("name")
                or (data.get("clean") or {}).get("name"))
        folder = Path(str(st.get("dir") or "")).name or "?"
        text = (f"{data.get('n')} images per corruption and severity of the corrupted set {folder} "
                f"({st.get('layout')}" + (f", made from {made}" if made else "") + ")")
    else:
        text = f"{data.get('n')} images of {data.get('name')}"
    if data.get("per_class"):
        text += f" (at most {data['per_class']} per class, subset seed {data.get('subset_seed')})"
    return text


def wall_phrase(run: dict) -> str:
    """The experiment's own time and, for a reproduce stage, the stage's whole wall time."""
    wall, stage = run.get("wall_s"), run.get("stage_wall_s")
    if stage is not None:
        return f"stage wall time {stage:.0f} s" + (f" (the experiment itself {wall:.0f} s)" if wall is not None else "")
    return f"{wall:.0f} s" if wall is not None else ""


def params_line(d: dict, *, params: bool = True) -> str:
    """The parameters that made a result, on one line, and the command(s) that made it (``params``
    False: the data, seed, device, time and command only, for sections that show them as a table)."""
    inp = d["inputs"]
    prm = {k: v for k, v in (inp.get("params") or {}).items() if k not in ("noise", "interpolate") and v is not None}
    prm = prm if params else {}
    bits = [f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in prm.items()]
    line = "; ".join(x for x in [data_phrase(inp.get("data") or {}), *bits, f"seed {inp.get('seed')}",
                                 f"{inp.get('device')} {inp.get('precision')}", wall_phrase(d.get("run") or {})] if x)
    made = made_by(d)
    return line + (f". {made}" if made else "")


def attack_params(d: dict) -> list[list[str]]:
    """An attack result's parameters as (name, value) rows: the protocol, the threat models and the
    attacks run (each attack's full description stays in the result file)."""
    prm = d["inputs"]["params"]
    proto = prm.get("protocol") or {}

    def val(v):
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x) for x in v) or "none"
        return "-" if v is None else str(v)

    rows = [[k.replace("_", " "), val(proto[k])] for k in ("rho", "batch_size", "runs", "steps", "restarts", "eot_m")
            if k in proto]
    rows.append(["step size", val(proto.get("step_size")) if proto.get("step_size") is not None
                 else str(prm.get("step_rule", "-"))])
    rows.append(["threat model", "; ".join(f"{t['threat_model']} eps {t['eps']:g}" for t in prm.get("threats", []))])
    rows.append(["attacks w/o adaptation", val(prm.get("no_adaptation_attacks"))])
    rows.append(["attacks on the adapted model", val(prm.get("adapted_attacks"))])
    rows.append(["paper's attack", val(prm.get("paper_attack"))])
    return rows


def _shell(argv: list) -> str:
    import shlex

    return " ".join(shlex.quote(str(a)) for a in argv)


def made_by(d: dict) -> str:
    """"Made by `COMMAND`": for a ``bnadapt reproduce`` stage, the stage and the reproduce call, then the
    standalone command(s) that give the same inputs and numbers (``run.commands``)."""
    run = d.get("run") or {}
    argv = command(d)
    cmds = run.get("commands")
    if cmds:
        alone = " then ".join(f"`{_shell(c)}`" for c in cmds)
        how = ("no command of its own; to redo this stage alone" if cmds[0][1:2] == ["reproduce"]
               else "the same result on its own")
        return f"Made by stage `{run.get('stage')}` of `{argv or 'bnadapt reproduce'}`; {how}: {alone}"
    return f"Made by `{argv}`" if argv else ""


def command(d: dict) -> str:
    """The command line that wrote a result (``run.argv``), as a shell would read it."""
    argv = list((d.get("run") or {}).get("argv") or [])
    if not argv:
        return ""
    if argv[0].endswith(("bnadapt", "__main__.py", "cli")) or "bnadapt" in argv[0]:
        argv[0] = "bnadapt"
    return _shell(argv)


_DRAWN: set[Path] = set()
"""Figures drawn by the report being built (cleared by :func:`build_blocks`): two results must never
draw to one file (the second would silently replace the first's figure in both sections)."""


def _figure(out: Path, name: str, draw, source: Path | None = None) -> Path | None:
    """Draw one figure into ``out/figures/name``; None when the result holds nothing to draw (a
    BnadaptError from the figure function). Any other failure is a bug and propagates. When another
    result of this report already drew ``name``, the figure is named after its result file ``source``
    too (``certify_M_adapt_FILE.png``), so each section shows its own figure."""
    path = out / "figures" / name
    stem, ext = Path(name).stem, Path(name).suffix
    k = 1
    while path in _DRAWN:
        tag = source.stem if source is not None and k == 1 else f"{source.stem if source else ''}{k}"
        path = out / "figures" / f"{stem}_{tag}{ext}"
        k += 1
    _DRAWN.add(path)
    try:
        draw(path)
    except BnadaptError:
        return None
    check(path.is_file(), f"figure {name} was not written; this is a bug in bnadapt.viz")
    return path


# ----------------------------------------------------------------------------------------- sections
def noise_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.viz import plot_sweep

    blocks: list[Block] = []
    for p, d in res.get("noise_table", []):
        prm = d["inputs"]["params"]
        rows = []
        for name in dict.fromkeys(r["model"] for r in d["results"]["rows"]):
            mine = [r for r in d["results"]["rows"] if r["model"] == name]
            rows.append([name] + [pct_cell(r["standard"]) for r in mine])
            rows.append(["+ adaptive BN"] + [pct_cell(r["adapted"]) for r in mine])
        blocks += [Block("h2", "Table 1: accuracy under Gaussian noise"),
                   Block("p", "Top-1 accuracy (%), mean ± 2 sd over runs, without and with per-batch adaptive BN."),
                   Block("table", header=["model"] + [f"σ = {s:g}" for s in prm["sigmas"]], rows=rows),
                   Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`.")]
    for exp, title in (("sweep_rho", "Table 4: accuracy against rho"),
                       ("sweep_batch_size", "Table 5: accuracy against the test batch size")):
        for p, d in res.get(exp, []):
            prm = d["inputs"]["params"]
            over = d["results"]["over"]
            vals = prm["values"]
            rows = [[r["model"], pct_cell(r["no_adaptation"])] + [pct_cell(s) for s in r["settings"]] for r in d["results"]["rows"]]
            blocks += [Block("h2", title),
                       Block("table", header=["model", "no adaptation"]
                             + [f"{'ρ' if over == 'rho' else 'batch'} = {v:g}" for v in vals], rows=rows),
                       Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`.")]
            fig = _figure(out, f"{exp}.png", lambda path, d=d: plot_sweep(d, path), p)
            if fig:
                blocks.append(Block("figure", text=title + " (as curves)", path=fig))
    return blocks


def certify_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.viz import certified_series, plot_certified

    items = res.get("certify", [])
    if not items:
        return []
    blocks = [Block("h2", "Certification by randomized smoothing (Fig. 1, Fig. 3, Table 6)"),
              Block("p", "Certified top-1 accuracy (%) at L2 radius; per-sigma rows at level alpha. For several sigmas: "
                         "the envelope of the per-sigma curves (best fixed sigma at each radius, sigma named) and the "
                         "label-free per-image selection at alpha/k (see docs/protocols.md).")]
    for p, d in items:
        r = d["results"]
        name = d["inputs"]["models"][0]["name"]
        adapt = d["inputs"]["params"]["adapt"] is not None
        rows = [[f"σ = {float(s):g}"] + [pct(a) for a in v["certified_accuracy"]] for s, v in r["per_sigma"].items()]
        if "envelope_of_curves" in r:
            env = r["envelope_of_curves"]
            rows.append(["envelope of curves"] + [pct(a) for a in env["certified_accuracy"]])
            rows.append(["… its σ"] + [f"{s:g}" for s in env["sigma"]])
            rows.append(["per-image selection"] + [pct(a) for a in r["per_image_selection"]["certified_accuracy"]])
        title = f"{name}{' + adaptive BN' if adapt else ' (no adaptation)'}"
        blocks += [Block("h3", title), Block("table", header=["L2 radius"] + [f"{x:g}" for x in r["radii"]], rows=rows),
                   Block("p", f"Parameters: {params_line(d)}. {r['num_images']} images; "
                              f"mean {r['mean_time_s'] or 0:.2f} s per image and sigma. File: `{p.name}`.")]
        fig = _figure(out, f"certify_{name}_{'adapt' if adapt else 'noadapt'}.png",
                      lambda path, d=d, t=title: plot_certified(certified_series(d), path, title=t), p)
        if fig:
            blocks.append(Block("figure", text=f"Fig. 3 layout: {title}", path=fig))
    # Fig. 1: one curve per run (a multi-sigma run contributes its envelope of curves)
    series = []
    for _, d in items:
        name = d["inputs"]["models"][0]["name"] + (" + adaptive BN" if d["inputs"]["params"]["adapt"] else "")
        series += certified_series(d, label=name, summary_only=True)
    fig = _figure(out, "fig1_certified.png", lambda path: plot_certified(series, path, title="Certified accuracy, all runs"))
    if fig:
        blocks.append(Block("figure", text="Fig. 1 layout: every run (multi-sigma runs: envelope of curves)", path=fig))
    return blocks


def gradient_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.gradients import load_npz
    from bnadapt.viz import plot_gradient_grid, plot_spectra

    blocks: list[Block] = []
    for p, d in res.get("gradient_maps", []):
        rows = [[r["model"], f"{r['sigma']:g}", r["mode"], pct(r["mean_background_share"])] for r in d["results"]["rows"]]
        blocks += [Block("h2", "Loss gradients under Gaussian noise (Fig. 2, Appendix C)"),
                   Block("p", "Share (%) of the loss gradient's L1 mass on background pixels (clean intensity < 0.1), "
                              "mean over the shown images; the paper's observation is that adaptation lowers it under noise.")]
        npz = Path(d["results"]["npz"])
        npz = npz if npz.exists() else p.with_name(npz.name)
        if npz.exists():
            arrays = load_npz(npz)
            for i in range(min(2, int(d["inputs"]["params"]["images"]))):
                fig = _figure(out, f"fig2_gradients_{i}.png",
                              lambda path, i=i: plot_gradient_grid(d, arrays, path, image=i), p)  # noqa: B023 (drawn at once)
                if fig:
                    blocks.append(Block("figure", text=f"Fig. 2 layout, image {i}", path=fig))
        blocks += [Block("table", header=["model", "σ", "mode", "background share %"], rows=rows),
                   Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`.")]
    for p, d in res.get("spectra", []):
        rows = [[r["corruption"], pct(r["perturbation_hf_share"]), pct(r["gradient_hf_share_standard"]),
                 pct(r["gradient_hf_share_adapted"])] for r in d["results"]["rows"]]
        blocks += [Block("h2", f"Fourier spectra of corruptions and loss gradients (Fig. 4), {d['results']['model']}"),
                   Block("table", header=["corruption", "corruption HF %", "gradient HF % w/o adapt",
                                          "gradient HF % with adapt"], rows=rows),
                   Block("p", f"HF: share of spectral energy outside the central quarter band. Parameters: "
                              f"{params_line(d)}. File: `{p.name}`.")]
        npz = Path(d["results"]["npz"])
        npz = npz if npz.exists() else p.with_name(npz.name)
        if npz.exists():
            arrays = load_npz(npz)
            fig = _figure(out, "fig4_spectra.png", lambda path: plot_spectra(d, arrays, path), p)  # noqa: B023 (drawn at once)
            if fig:
                blocks.append(Block("figure", text="Fig. 4 layout", path=fig))
    return blocks


def attack_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.attacks.report import attack_tables, format_checks, poison_tables
    from bnadapt.viz import plot_poison

    blocks: list[Block] = []
    for p, d in res.get("attack", []):
        head, tables = attack_tables(d)
        blocks += [Block("h2", "Adversarial attacks on the adapted model (Tables 2 and 7)"),
                   Block("p", head + ". The deployed defense is the per-batch adapted model; every attack forwards "
                              "whole batches. [paper] marks the paper's attack; the worst case over all attacks is "
                              "the strongest honest number (docs/attacks.md).")]
        for title, header, rows in tables:
            blocks += [Block("p", f"**{title}**"), Block("table", header=header, rows=rows)]
        warn = [r for r in d["results"].get("checks", []) if r["warning"]]
        blocks.append(Block("list", items=format_checks(warn).splitlines()) if warn
                      else Block("p", format_checks(d["results"].get("checks", []))))
        blocks += [Block("p", "**Parameters**"), Block("table", header=["parameter", "value"], rows=attack_params(d)),
                   Block("p", f"{params_line(d, params=False)}. File: `{p.name}`.")]
    for p, d in res.get("poison", []):
        head, tables = poison_tables(d)
        blocks += [Block("h2", "Batch poisoning (beyond the paper)"), Block("p", head + ".")]
        for title, header, rows in tables:
            if title:
                blocks.append(Block("p", f"**{title}**"))
            blocks.append(Block("table", header=header, rows=rows))
        blocks.append(Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`."))
        fig = _figure(out, "poison.png", lambda path, d=d: plot_poison(d, path), p)
        if fig:
            blocks.append(Block("figure", text="Benign accuracy against the poisoned fraction", path=fig))
    return blocks


SATURATE_GRAY = ("saturate changes nothing on gray images: the library scales the HSV saturation, which is 0 for "
                 "three equal channels, and bnadapt keeps the first channel, which equals the clean image at every "
                 "severity (docs/corruptions.md). Its row is clean accuracy, not a corruption result; as a hold-out "
                 "corruption it enters neither corrupt nor mCE.")


def reference_gaps(d: dict) -> list[str]:
    """One line when the mCE reference table lacks corruptions that were evaluated (mCE is then n/a):
    which ones, and the fix."""
    from bnadapt.corruptions.names import COMMON

    ref = d["results"].get("reference")
    if not ref:
        return []
    have = ref.get("errors") or {}
    lacking = [c for c in d["inputs"]["params"]["corruptions"] if c not in have]
    if not lacking:
        return []
    effect = ("mCE and relative mCE are n/a" if any(c in COMMON for c in lacking)
              else "its cells of those corruptions are n/a")
    by_reproduce = bool((d.get("run") or {}).get("stage"))
    fix = ("rerun `bnadapt reproduce --force corruptions` (a reference model is measured again on every corruption "
           "of the set; a reference file passed with --reference must hold them all)" if by_reproduce else
           "delete that reference file beside the set and rerun the evaluation, so that the reference model is "
           "measured on every corruption (or pass a reference file that holds them all)")
    return [f"The mCE reference table ({ref.get('name')}: {ref.get('source')}) lacks {len(lacking)} of the evaluated "
            f"corruptions ({', '.join(lacking)}), so {effect}. Fix: {fix}."]


def _gray(d: dict) -> bool:
    shape = ((d["inputs"].get("data") or {}).get("set") or {}).get("image_shape") or []
    return bool(shape) and shape[0] == 1


def corruption_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.corruptions.tables import table3, table8
    from bnadapt.viz import plot_corruption_heatmap

    blocks: list[Block] = []
    for p, d in res.get("corruption_eval", []):
        head3, h3, r3, notes = table3(d)
        head8, h8, r8 = table8(d)
        notes = notes + reference_gaps(d)
        blocks += [Block("h2", "Common corruptions (Tables 3 and 8)"), Block("p", head3 + "."),
                   Block("table", header=h3, rows=r3)]
        if notes:
            blocks.append(Block("list", items=notes))
        saturate = _gray(d) and any(r[1] == "saturate" for r in r8)
        if saturate:  # an exact no-op on gray images: say so beside its row
            r8 = [r[:1] + ["saturate (no-op on gray images: = clean)"] + r[2:] if r[1] == "saturate" else r
                  for r in r8]
        blocks += [Block("h3", "Per corruption (Table 8 layout)"), Block("p", head8 + "."),
                   Block("table", header=h8, rows=r8)]
        if saturate:
            blocks.append(Block("p", "Note: " + SATURATE_GRAY))
        blocks.append(Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`."))
        fig = _figure(out, "table8_heatmap.png", lambda path, d=d: plot_corruption_heatmap(d, path), p)
        if fig:
            blocks.append(Block("figure", text="Table 8 as a heat map: accuracy per corruption and severity", path=fig))
    return blocks


def stream_blocks(res: dict, out: Path) -> list[Block]:
    from bnadapt.stream.evaluate import format_stream_table
    from bnadapt.viz import plot_stream

    blocks: list[Block] = []
    for p, d in res.get("stream", []):
        blocks += [Block("h2", "Streams: adaptation with small batches (beyond the paper)"),
                   Block("code", text=format_stream_table(d)),
                   Block("p", f"Parameters: {params_line(d)}. File: `{p.name}`.")]
        fig = _figure(out, f"stream_{p.stem}.png", lambda path, d=d: plot_stream(d, path), p)
        if fig:
            blocks.append(Block("figure", text="Accuracy along the stream", path=fig))
    return blocks


SECTIONS = [noise_blocks, certify_blocks, attack_blocks, corruption_blocks, gradient_blocks, stream_blocks]


def run_blocks(res: dict) -> list[Block]:
    man = res.get("reproduce")
    if not man:
        return []
    _, d = man[0]
    prm = d["inputs"]["params"]
    sec = lambda v: f"{v:.0f}" if v is not None else ""  # noqa: E731
    rows = [[s["stage"], s["status"], sec(s.get("wall_s")), sec(s.get("experiment_wall_s"))]
            for s in d["results"]["stages"]]
    blocks = [Block("h2", "This run"),
              Block("p", f"Models: {', '.join(m['name'] for m in d['inputs']['models'])}. Data: "
                         f"{d['inputs']['data']['spec']}. Protocol: **{prm['protocol']}**. Device: {d['inputs']['device']}. "
                         f"Wall time of this invocation: {d['run']['wall_s']:.0f} s (cached stages cost nothing)."),
              Block("p", "Stage wall time: the whole stage when it last ran (for the corruption stage: generating the "
                         "set, the reference table and the evaluation); the experiment's own time is its result "
                         "file's timer."),
              Block("table", header=["stage", "status", "stage wall s (when it ran)", "experiment's own s"],
                    rows=rows)]
    if prm["protocol"] == "quick":
        rows = [[k, json.dumps(v), prm["paper"].get(k, "")] for k, v in prm["sizes"].items()]
        blocks += [Block("h3", "Reduced parameters of the quick protocol"),
                   Block("p", "Every size below is smaller than the paper's; `bnadapt reproduce --full` uses the paper's."),
                   Block("table", header=["stage", "quick", "paper (--full)"], rows=rows)]
    return blocks


def claims_blocks(res: dict) -> list[Block]:
    from bnadapt.claims import all_claims

    rows = [[c.claim, c.paper, c.measured, c.verdict, c.note] for c in all_claims(res)]
    return [Block("h2", "The paper's claims, measured here"),
            Block("p", "Each claim of Nandy et al. beside what this run measured. Paper numbers are ImageNet ResNet-50; "
                       "this run's are on the data and models named below (the default: Fashion-MNIST and the shipped "
                       "small ResNets, where chance is 10%)."),
            Block("table", header=["claim", "paper", "measured here", "verdict", "how the verdict is decided"], rows=rows)]


def build_blocks(folder: Path) -> list[Block]:
    _DRAWN.clear()
    res = load_results(folder)
    check(any(k != "reproduce" for k in res), f"no bnadapt result files found in {folder}; run bnadapt reproduce "
                                              "or pass the folder holding result files")
    blocks = [Block("h1", "bnadapt report: covariate shift adaptation for adversarially robust classifiers")]
    blocks += claims_blocks(res)
    blocks += run_blocks(res)
    for section in SECTIONS:
        blocks += section(res, folder)
    return blocks


def build_report(folder: str | Path, md: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (and ``figures/``) in ``folder`` from its result files.

    ``md`` writes the Markdown there instead (e.g. ``docs/results.md``), with its figures copied into a
    folder beside it (``results_figures/``), so the page is self-contained in its new place."""
    import shutil

    folder = Path(folder)
    check(folder.is_dir(), f"report folder {folder} does not exist; pass the folder holding the result files")
    blocks = build_blocks(folder)
    page = folder / "report.html"
    md_blocks = blocks
    if md is None:
        md_path, base = folder / "report.md", folder
    else:
        from dataclasses import replace

        md_path = Path(md)
        base = md_path.parent
        figs = base / f"{md_path.stem}_figures"
        figs.mkdir(parents=True, exist_ok=True)
        md_blocks = []
        for b in blocks:
            if b.kind == "figure":
                shutil.copyfile(b.path, figs / b.path.name)
                b = replace(b, path=figs / b.path.name)
            md_blocks.append(b)
    atomic_write_text(md_path, to_markdown(md_blocks, base))
    atomic_write_text(page, to_html(blocks))
    return {"md": md_path, "html": page}
