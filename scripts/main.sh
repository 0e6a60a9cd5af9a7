#!/usr/bin/env bash
# The main job on the default data (Fashion-MNIST) and the four shipped zoo models: the paper's whole
# protocol at reduced sizes (`bnadapt reproduce --quick`), then results/report.md and results/report.html.
# Every stage writes one result file and is skipped when a file with the same inputs hash exists, so a
# second run (or a run after an interruption) reuses what is done. Extra arguments go to `bnadapt
# reproduce` (e.g. `--full` for the paper's sizes, `--force certify`, `--stages noise,certify`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/bnadapt reproduce --quick --out "${RESULTS:-results}" "$@"
