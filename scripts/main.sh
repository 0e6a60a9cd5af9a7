#!/usr/bin/env bash
# The main job on the default data and models: Table 1 (accuracy under Gaussian noise with and
# without adaptive BN) for the four shipped Fashion-MNIST zoo models. Writes results/ (JSON + table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p results
.venv/bin/bnadapt zoo
.venv/bin/bnadapt noise --model zoo:baseline --model zoo:gaussian-0.5 --model zoo:adv-linf-0.1 \
  --model zoo:adv-l2-1.5 --runs 5 --out results/table1_noise.json | tee results/table1_noise.txt
