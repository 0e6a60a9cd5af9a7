#!/usr/bin/env bash
# The main job on the default data (Fashion-MNIST test set) and the shipped zoo models. Writes
# results/ (result files in the one JSON format, TSV rows, plots); about 20 minutes on a quiet 2-core CPU.
#   1. Table 1: accuracy under Gaussian noise, with and without adaptive BN, 4 models, 5 runs.
#   2. Tables 4 and 5: rho and test-batch-size sweeps at sigma 0.5 for the adversarially trained models.
#   3. Fig. 1 / Fig. 3 / Table 6: randomized-smoothing certification of adv-l2-1.5 adapted at each
#      sigma (calibration split; 100 images, 10 per class, n = 10,000 samples, alpha = 0.001), and
#      the paper's comparison rows: adv-l2-1.5 without adaptation and gaussian-0.5, at sigma 0.25 / 0.5.
# Set QUICK=1 for a smoke run (fewer images and samples); RUNS, CERT_IMAGES, CERT_PER_CLASS and
# CERT_SAMPLES override the sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
B=.venv/bin/bnadapt
R=results
mkdir -p "$R"
if [ "${QUICK:-0}" = 1 ]; then SUB=(--images 1000); RUNS=2; CERT=(--images 10 --per-class 1 --samples 1000); else SUB=(); RUNS=${RUNS:-5}; CERT=(--images "${CERT_IMAGES:-100}" --per-class "${CERT_PER_CLASS:-10}" --samples "${CERT_SAMPLES:-10000}"); fi

$B zoo
$B noise --model zoo:baseline --model zoo:gaussian-0.5 --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 \
  --runs $RUNS "${SUB[@]}" --out "$R/table1_noise.json"
$B sweep rho --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --runs $RUNS "${SUB[@]}" --out "$R/table4_rho.json"
$B sweep batch-size --model zoo:adv-linf-0.1 --model zoo:adv-l2-1.5 --runs $RUNS "${SUB[@]}" --out "$R/table5_batch.json"
rm -f "$R"/certify_*
$B certify --model zoo:adv-l2-1.5 --adapt --sigmas 0.25,0.5,0.75 "${CERT[@]}" --quiet --out "$R/certify_adv-l2_adapt.tsv"
$B certify --model zoo:adv-l2-1.5 --sigmas 0.25 "${CERT[@]}" --quiet --out "$R/certify_adv-l2_noadapt.tsv"
$B certify --model zoo:gaussian-0.5 --sigmas 0.5 "${CERT[@]}" --quiet --out "$R/certify_gaussian-0.5.tsv"
$B plot-certified "$R/certify_adv-l2_adapt.json=adv-l2-1.5 + adaptive BN" \
  "$R/certify_adv-l2_noadapt.json=adv-l2-1.5" "$R/certify_gaussian-0.5.json=gaussian-0.5" \
  --title "Fashion-MNIST: certified accuracy (paper Fig. 1)" --out "$R/fig1_certified.png"
echo "main job done: results in $R/"
