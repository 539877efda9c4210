#!/usr/bin/env bash
# PNI on MVTec AD "bottle" with saved (e.g. the published pretrained) models: no training.
#
# Every stage loads its artefacts from
# $EMBEDDING_ROOT/embeddings_layer2+layer3/bottle/<backbone>/ (the published model folder
# is meant to sit in /root: EMBEDDING_ROOT=/root),
# scores the test set with WR101, RNX101 and DN201 (seed 23, as the original), ensembles them, converts
# to the ravel format and analyses.
#
# Environment (DATASET_PATH, PYTHON, RESULT_ROOT, EMBEDDING_ROOT, CATEGORIES, BACKBONES,
# EXTRA_ARGS): see scripts/lib/evaluate_amap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASET_CATEGORY=MVTec
DEFAULT_DATASET_PATH=../dataset/MVTecAD
DEFAULT_CATEGORIES="bottle"
DEFAULT_BACKBONES="WR101 RNX101 DN201"
SEED=23
LOAD_ONLY=1  # no --train_* flags: every stage loads its saved artefacts
source scripts/lib/evaluate_amap.sh
