#!/usr/bin/env bash
# Retrain the Fashion-MNIST zoo from scratch: bnadapt/zoo/NAME.safetensors + NAME.json (model card).
#
#   scripts/train_zoo.sh                      # all four models
#   scripts/train_zoo.sh adv-l2-1.5 baseline  # only these
#   scripts/train_zoo.sh baseline -- --train-limit 2000 --eval-limit 500 --epochs 1   # extra args to every run
#
# Environment: PYTHON (default .venv/bin/python), OUT_DIR (default bnadapt/zoo; point it elsewhere for
# smoke tests), CHECK_TARGETS=0 to skip the target check at the end (exit 1 when a target is missed).
#
# Exact recipes (seed 0, batch 128, SGD nesterov momentum 0.9, weight decay 5e-4, one-cycle lr peak 0.1,
# 5,000-image validation hold-out for best-epoch selection; see bnadapt/train.py):
#   baseline      standard, crop(pad 2)+flip augmentation                          15 epochs
#   gaussian-0.5  gaussian, sigma 0.5, no augmentation                             12 epochs
#   adv-linf-0.1  pgd-linf, eps 0.1, 7 steps of 0.025, random start, no augmentation  7 epochs
#   adv-l2-1.5    pgd-l2,   eps 1.5, 7 steps of 0.375, random start, no augmentation 12 epochs
# (A first full run with crop+flip for all four missed the clean-accuracy floors of the three robust
# models by 0.6-3 points in these short schedules; without augmentation they meet them: docs/zoo.md.)
# Expected wall time on the 2-core CPU: about 4 + 4 + 15 + 23 minutes (PGD-7 epochs ~110 s).
# Each run resumes from its NAME.resume.pt if an earlier run of this script was interrupted.
#
# Targets on the 10,000 test images (card "metrics"):
#   baseline      clean_acc >= 0.92
#   gaussian-0.5  clean_acc >= 0.85, noise_acc_0.5 >= 0.83
#   adv-linf-0.1  clean_acc >= 0.85, pgd_acc (Linf PGD-20, step 0.01) >= 0.75
#   adv-l2-1.5    clean_acc >= 0.84, pgd_acc (L2 PGD-20, step 2.5*eps/20) >= 0.65
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT_DIR="${OUT_DIR:-bnadapt/zoo}"
ALL=(baseline gaussian-0.5 adv-linf-0.1 adv-l2-1.5)

names=()
extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  names+=("$1"); shift
done
[ ${#names[@]} -gt 0 ] || names=("${ALL[@]}")

recipe_args() {
  case "$1" in
    baseline)     echo "standard --epochs 15 --seed 0" ;;
    gaussian-0.5) echo "gaussian --sigma 0.5 --epochs 12 --seed 0 --augment none" ;;
    adv-linf-0.1) echo "pgd-linf --eps 0.1 --steps 7 --step-size 0.025 --epochs 7 --seed 0 --augment none" ;;
    adv-l2-1.5)   echo "pgd-l2 --eps 1.5 --steps 7 --step-size 0.375 --epochs 12 --seed 0 --augment none" ;;
    *) echo "error: unknown zoo model '$1'; choose from: ${ALL[*]}" >&2; return 2 ;;
  esac
}

for name in "${names[@]}"; do recipe_args "$name" > /dev/null || exit 2; done  # validate all names first

mkdir -p "$OUT_DIR"
t_all=$(date +%s)
for name in "${names[@]}"; do
  # shellcheck disable=SC2046
  set -- $(recipe_args "$name")
  echo "=== $name: bnadapt train $* --out $OUT_DIR/$name.safetensors --resume --overwrite --device cpu ${extra[*]:-}"
  t0=$(date +%s)
  "$PY" -m bnadapt.cli train "$@" --out "$OUT_DIR/$name.safetensors" --resume --overwrite --device cpu ${extra[@]+"${extra[@]}"}
  echo "=== $name: $(( $(date +%s) - t0 )) s"
done
total=$(( $(date +%s) - t_all ))
echo "=== total wall time: ${total} s ($(( total / 60 )) min $(( total % 60 )) s)"

"$PY" - "$OUT_DIR" "${CHECK_TARGETS:-1}" "${names[@]}" <<'EOF'
import json, sys
out_dir, check, names = sys.argv[1], sys.argv[2] != "0", sys.argv[3:]
targets = {
    "baseline": {"clean_acc": 0.92},
    "gaussian-0.5": {"clean_acc": 0.85, "noise_acc_0.5": 0.83},
    "adv-linf-0.1": {"clean_acc": 0.85, "pgd_acc": 0.75},
    "adv-l2-1.5": {"clean_acc": 0.84, "pgd_acc": 0.65},
}
missed = []
for name in names:
    card = json.load(open(f"{out_dir}/{name}.json"))
    m, r = card["metrics"], card["recipe"]
    parts = []
    for key, floor in targets[name].items():
        ok = m.get(key, -1) >= floor
        parts.append(f"{key} {100 * m.get(key, float('nan')):.2f}% (target {100 * floor:.0f}%{'' if ok else ', MISSED'})")
        if not ok:
            missed.append(f"{name} {key}")
    print(f"{name:<13} best epoch {r['best_epoch']}/{r['epochs']}, {card['training']['wall_time_s']:.0f} s: " + ", ".join(parts))
if missed and check:
    print("targets missed: " + ", ".join(missed), file=sys.stderr)
    sys.exit(1)
EOF
