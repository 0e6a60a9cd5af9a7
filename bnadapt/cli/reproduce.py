"""``bnadapt reproduce`` (the paper's whole protocol, cached stage by stage, then the report) and
``bnadapt report DIR`` (the report from existing result files)."""

from __future__ import annotations

from pathlib import Path

from bnadapt.cli import options as opt
from bnadapt.errors import check, check_seed


def cmd_reproduce(args) -> int:
    from bnadapt.reproduce import GROUPS, ZOO_MODELS, _names, reproduce
    from bnadapt.results import check_output

    check_seed(args.seed, "--seed")
    stages = _names([args.stages], GROUPS, "--stages") if args.stages else None
    out = Path(args.out)
    check(not out.is_file(), f"--out {out} is a file; give a folder for the result files and the report")
    check_output(out / "report.html", "--out")
    dev = opt.device(args)
    reproduce(out, models=args.model or list(ZOO_MODELS), data=args.data, protocol="full" if args.full else "quick",
              stages=stages, force=args.force or (), device=dev, seed=args.seed, quiet=args.quiet, log=opt.say,
              reference=args.reference)
    return 0


def cmd_report(args) -> int:
    from bnadapt.report import build_report

    folder = Path(args.folder)
    check(folder.is_dir(), f"{folder} is not a folder; pass the folder holding the result files")
    from bnadapt.results import check_output

    check_output(folder / "report.html", "the report in that folder")
    md = check_output(args.md, "--md", suffixes=(".md",)) if args.md else None
    paths = build_report(folder, md=md)
    opt.say(f"wrote {paths['md']} and {paths['html']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's whole protocol on the zoo (or your models), with figures and a report",
                       description="Run the paper's experiments as cached stages (noise: Table 1 and Tables 4-5; "
                                   "certify: Fig. 1, 3, Table 6; attacks: Tables 2, 7 and batch poisoning; "
                                   "corruptions: Tables 3, 8; gradients: Figs. 2, 4), each one result file, skipped "
                                   "when a file with the same inputs hash exists; then report.md and report.html.")
    p.add_argument("--model", action="append", default=None,
                   help="a model (repeatable; default: the four zoo models). " + opt.MODEL_HELP)
    p.add_argument("--data", default="fashion-mnist", help=opt.DATA_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="reduced sizes, every reduction stated in the report (default)")
    g.add_argument("--full", action="store_true", help="the paper's parameters (hours on a CPU; see docs/results.md)")
    p.add_argument("--stages", default=None,
                   help="comma-separated groups to run: noise,certify,attacks,corruptions,gradients,stream")
    p.add_argument("--force", action="append", default=None, metavar="STAGE",
                   help="redo a group or a stage even when its result is cached (repeatable)")
    p.add_argument("--reference", default="default",
                   help="mCE reference for the corruption stage: a model spec (its table is measured once beside the "
                        "corrupted set, and again when it lacks some of the set's corruptions), a corruption_reference "
                        "result file, alexnet, or none (default: zoo:baseline for Fashion-MNIST, none otherwise)")
    opt.add_seed(p)
    opt.add_device(p)
    opt.add_quiet(p)
    p.add_argument("--out", default="results", help="folder for result files, figures and the report (default results)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="report.md and report.html from the result files in a folder")
    p.add_argument("folder", help="folder holding bnadapt result files (e.g. what reproduce wrote)")
    p.add_argument("--md", default=None, help="write the Markdown report here instead (its figures are copied into "
                                              "a folder beside it); report.html stays in the folder")
    p.set_defaults(func=cmd_report)
