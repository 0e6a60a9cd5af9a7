"""``bnadapt train``: the training recipes (standard, gaussian, pgd-linf, pgd-l2)."""

from __future__ import annotations

import argparse

from bnadapt.cli import options as opt


def cmd_train(args) -> int:
    from bnadapt.train import CONFIG_FIELDS, train

    options = {k: getattr(args, k) for k in CONFIG_FIELDS[1:] if getattr(args, k, None) is not None}
    dev = opt.device(args)
    res = train(args.recipe, args.out, resume=args.resume, stop_after=args.stop_after, keep_resume=args.keep_resume,
                overwrite=args.overwrite, device=dev, progress=not args.quiet, **options)
    if res.completed:
        opt.say(f"{res.path}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in res.card["metrics"].items()))
    return 0


def register(sub) -> None:
    from bnadapt.train import AUGMENTATIONS, RECIPES

    p = sub.add_parser("train", help="train a model: standard, gaussian, pgd-linf or pgd-l2 (Fashion-MNIST ResNet)",
                       description="Train the Fashion-MNIST pre-activation ResNet with one recipe, keep the best "
                                   "epoch on a validation hold-out, and write a checkpoint with a model card.")
    p.add_argument("recipe", metavar="RECIPE", help=f"one of {', '.join(RECIPES)}")
    p.add_argument("--out", required=True, help="output checkpoint PATH(.safetensors); the card is PATH.json")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    p.add_argument("--eps", type=float, default=None,
                   help="pgd recipes: attack radius in pixels (default 0.1 for pgd-linf, 1.5 for pgd-l2)")
    p.add_argument("--step-size", type=float, default=None, help="pgd recipes: PGD step size (default 2.5*eps/steps)")
    p.add_argument("--steps", type=int, default=None, help="pgd recipes: PGD steps (default 7)")
    p.add_argument("--sigma", type=float, default=None, help="gaussian: noise std in pixels (default 0.5)")
    p.add_argument("--seed", type=int, default=None, help="seed of initialization, order, augmentation, noise (default 0)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the one-cycle schedule (default 0.1)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    p.add_argument("--val-size", type=int, default=None, help="validation hold-out for early stopping (default 5000)")
    p.add_argument("--data", default=None, help="dataset spec with train and test splits (default fashion-mnist)")
    p.add_argument("--eval-limit", type=int, default=None, help="measure test metrics on the first N images only")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N training images only (quick runs)")
    p.add_argument("--augment", default=None, choices=AUGMENTATIONS,
                   help="training augmentation: crop-flip (default), flip, none")
    p.add_argument("--resume", action="store_true", help="continue from PATH.resume.pt if it exists")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch, keeping the resume state (continue later with --resume)")
    p.add_argument("--keep-resume", action="store_true", help="keep PATH.resume.pt after the final checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished checkpoint at --out")
    opt.add_device(p, loading=False)
    opt.add_quiet(p)
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
