#!/usr/bin/env bash
# PNI on MVTec AD, ensemble of WideResNet101-2, ResNeXt101-32x8d and DenseNet201 (seed 23, as the original).
#
# For each backbone and category: build the coresets, learn the priors and score the
# test set; then ensemble the three backbones, convert to the ravel format and analyse.
#
# Environment (DATASET_PATH, PYTHON, RESULT_ROOT, EMBEDDING_ROOT, CATEGORIES, BACKBONES,
# SKIP_TRAIN, EXTRA_ARGS): see scripts/lib/evaluate_amap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_CATEGORY=MVTec
DEFAULT_DATASET_PATH=../dataset/MVTecAD
DEFAULT_CATEGORIES="bottle cable capsule carpet grid hazelnut leather metal_nut pill screw tile toothbrush transistor wood zipper"
DEFAULT_BACKBONES="WR101 RNX101 DN201"
SEED=23
source scripts/lib/evaluate_amap.sh
