#!/usr/bin/env bash
# PNI on VisA, ensemble of WideResNet101-2, ResNeXt101-32x8d and DenseNet201 (seed 23, as the original).
#
# For each backbone and each of the 12 categories: build the coresets, learn the
# priors and score the test set; then ensemble, convert and analyse.
#
# Environment (DATASET_PATH, PYTHON, RESULT_ROOT, EMBEDDING_ROOT, CATEGORIES, BACKBONES,
# SKIP_TRAIN, EXTRA_ARGS): see scripts/lib/evaluate_amap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_CATEGORY=VisA
DEFAULT_DATASET_PATH=../dataset/VisA
DEFAULT_CATEGORIES="candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4 pipe_fryum"
DEFAULT_BACKBONES="WR101 RNX101 DN201"
SEED=23
source scripts/lib/evaluate_amap.sh
