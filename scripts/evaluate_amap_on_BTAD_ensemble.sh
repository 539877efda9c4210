#!/usr/bin/env bash
# PNI on BTAD, ensemble of WideResNet101-2, ResNeXt101-32x8d and DenseNet201 (seed 23, as the original).
#
# For each backbone and category (01 02 03): build the coresets, learn the priors and
# score the test set; then ensemble, convert (--is_BTAD) and analyse.
#
# Environment (DATASET_PATH, PYTHON, RESULT_ROOT, EMBEDDING_ROOT, CATEGORIES, BACKBONES,
# SKIP_TRAIN, EXTRA_ARGS): see scripts/lib/evaluate_amap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_CATEGORY=BTAD
DEFAULT_DATASET_PATH=../dataset/BTAD
DEFAULT_CATEGORIES="01 02 03"
DEFAULT_BACKBONES="WR101 RNX101 DN201"
SEED=23
RAVEL_FLAGS=--is_BTAD
source scripts/lib/evaluate_amap.sh
