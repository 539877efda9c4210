#!/usr/bin/env bash
# PNI on MVTec AD "bottle" with saved (e.g. the published pretrained) models: no training.
#
# Every stage loads its artefacts from
# $EMBEDDING_ROOT/embeddings_layer2+layer3/bottle/<backbone>/ (the published model folder
# is meant to sit in /root: EMBEDDING_ROOT=/root),
# scores the test set with WR101, RNX101 and DN201 (seed 22), ensembles them, converts
# to the ravel format and analyses.
#
# Run it from anywhere: it works in the repository root, and every relative path (the
# defaults below included) is relative to the repository root. Environment:
#   DATASET_PATH    dataset root (default ../dataset/MVTecAD)
#   PYTHON          Python interpreter (default python)
#   RESULT_ROOT     result folder (default ./result): score_result.csv,
#                   ensemble_score_result.csv, ensemble_result/, ensemble_ravel/ (with
#                   score_result.csv and viz/<category>/)
#   EMBEDDING_ROOT  folder that holds embeddings_layer2+layer3/<category>/<backbone>/ (default .)
#   CATEGORIES      space-separated categories (default: bottle)
#   BACKBONES       space-separated backbones, each run then ensembled (default: WR101 RNX101 DN201)
#   EXTRA_ARGS      more flags for every train_coreset_distribution.py call, placed after
#                   the script's own so that they win (argparse keeps the last value), e.g.
#                   EXTRA_ARGS="--accelerator cpu --resize 256 --imagesize 224"
#                   (split on white space: no paths with spaces)
# Each run of a backbone adds a new version_<k> result folder; the ensemble uses the newest.
# ensemble_result/ keeps the categories of earlier runs, and convert/analysis cover all of
# them: give each dataset its own RESULT_ROOT to keep them apart.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATASET_PATH=${DATASET_PATH:-../dataset/MVTecAD}
RESULT_ROOT=${RESULT_ROOT:-./result}
EMBEDDING_ROOT=${EMBEDDING_ROOT:-.}
read -r -a categories <<< "${CATEGORIES:-bottle}"
read -r -a backbones <<< "${BACKBONES:-WR101 RNX101 DN201}"
read -r -a extra <<< "${EXTRA_ARGS:-}"
train=()  # no --train_* flags: every stage loads its saved artefacts
if [[ ! -d "$DATASET_PATH" ]]; then
  echo "error: dataset folder $DATASET_PATH not found (set DATASET_PATH; relative paths start at $PWD)" >&2
  exit 2
fi
if [[ ${#categories[@]} -eq 0 || ${#backbones[@]} -eq 0 ]]; then
  echo "error: CATEGORIES and BACKBONES must not be empty" >&2
  exit 2
fi

for backbone in "${backbones[@]}"; do
  for category in "${categories[@]}"; do
    echo "== MVTec $category, $backbone"
    "$PYTHON" train_coreset_distribution.py ${train[@]+"${train[@]}"} \
      --dataset_path "$DATASET_PATH" --dataset_category MVTec --category "$category" \
      --project_root_path "$RESULT_ROOT" --embedding_root_path "$EMBEDDING_ROOT" \
      --backbone "$backbone" --seed 22 ${extra[@]+"${extra[@]}"}
  done
done

ENSEMBLE_ROOT=$RESULT_ROOT/ensemble_result
RAVEL_ROOT=$RESULT_ROOT/ensemble_ravel
"$PYTHON" analysis_code/calc_ensemble_score.py --category "${categories[@]}" \
  --project_root_path "$RESULT_ROOT" --ensemble_root_path "$ENSEMBLE_ROOT" \
  --backbone_list "${backbones[@]}"
shopt -s nullglob
for dir in "$ENSEMBLE_ROOT"/*/; do
  name=$(basename "$dir")
  if [[ " ${categories[*]} " != *" $name "* ]]; then
    echo "note: $ENSEMBLE_ROOT also holds $name from an earlier run; it is converted and analysed too" >&2
  fi
done
"$PYTHON" analysis_code/convert_result_format.py \
  --before_result_root_dir "$ENSEMBLE_ROOT" --after_result_root_dir "$RAVEL_ROOT"
"$PYTHON" analysis_code/analysis_amap.py --project_root_path "$RAVEL_ROOT" --visualize --calc_pro
echo "scores: $RESULT_ROOT/score_result.csv, $RESULT_ROOT/ensemble_score_result.csv, $RAVEL_ROOT/score_result.csv"
echo "pictures: $RAVEL_ROOT/viz/<category>/"
