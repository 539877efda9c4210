#!/usr/bin/env bash
# PNI on MVTec AD with WideResNet101-2, the paper's single model (seed 23).
#
# For each category: build the coresets, learn the neighbourhood and position priors
# and score the test set; then ensemble (WR101 alone), convert to the ravel format and
# analyse (I-AUROC, P-AUROC, AUPRO, pictures).
#
# Environment (DATASET_PATH, PYTHON, RESULT_ROOT, EMBEDDING_ROOT, CATEGORIES, BACKBONES,
# SKIP_TRAIN, EXTRA_ARGS): see scripts/lib/evaluate_amap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_CATEGORY=MVTec
DEFAULT_DATASET_PATH=../dataset/MVTecAD
DEFAULT_CATEGORIES="bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
DEFAULT_BACKBONES="WR101"
SEED=23
source scripts/lib/evaluate_amap.sh
