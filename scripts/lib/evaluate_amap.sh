# Shared body of the evaluate_amap_on_*.sh scripts: train (or load) every backbone x
# category, then ensemble, convert to the ravel format and analyse. Sourced, not run.
#
# The calling script sets, before sourcing it (after `cd` to the repository root):
#   DATASET_CATEGORY      MVTec | BTAD | VisA
#   DEFAULT_DATASET_PATH  dataset root when DATASET_PATH is unset
#   DEFAULT_CATEGORIES    categories when CATEGORIES is unset
#   DEFAULT_BACKBONES     backbones when BACKBONES is unset
#   SEED                  --seed of every training run
#   LOAD_ONLY=1           never pass --train_* flags (saved / published artefacts)
#   RAVEL_FLAGS           extra flags for convert and analysis (e.g. --is_BTAD)
#
# The scripts run from anywhere: they work in the repository root, and every relative path
# (the defaults included) is relative to the repository root. Environment:
#   DATASET_PATH    dataset root (default: the calling script's, e.g. ../dataset/MVTecAD)
#   PYTHON          Python interpreter (default: the repository's .venv/bin/python, made by
#                   `make venv`, when it exists; else python)
#   RESULT_ROOT     result folder (default ./result): score_result.csv,
#                   ensemble_score_result.csv, ensemble_result/, ensemble_ravel/ (with
#                   score_result.csv and viz/<category>/)
#   EMBEDDING_ROOT  folder that holds embeddings_layer2+layer3/<category>/<backbone>/ (default .)
#   CATEGORIES      space-separated categories (default: the calling script's)
#   BACKBONES       space-separated backbones, each run then ensembled (default: the script's)
#   SKIP_TRAIN=1    load the saved coresets and priors (no --train_* flags) instead of
#                   rebuilding them
#   EXTRA_ARGS      more flags for every train_coreset_distribution.py call, placed after
#                   the script's own so that they win (argparse keeps the last value), e.g.
#                   EXTRA_ARGS="--accelerator cpu --resize 256 --imagesize 224"
#                   (split on white space: no paths with spaces)
# Each run of a backbone adds a new version_<k> result folder; the ensemble uses the newest.
# ensemble_result/ keeps the categories of earlier runs, and convert/analysis cover all of
# them: give each dataset its own RESULT_ROOT to keep them apart.

PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DATASET_PATH=${DATASET_PATH:-$DEFAULT_DATASET_PATH}
RESULT_ROOT=${RESULT_ROOT:-./result}
EMBEDDING_ROOT=${EMBEDDING_ROOT:-.}
read -r -a categories <<< "${CATEGORIES:-$DEFAULT_CATEGORIES}"
read -r -a backbones <<< "${BACKBONES:-$DEFAULT_BACKBONES}"
read -r -a extra <<< "${EXTRA_ARGS:-}"
read -r -a ravel_flags <<< "${RAVEL_FLAGS:-}"
train=(--train_coreset --train_nb_dist --train_coor_dist)
if [[ "${LOAD_ONLY:-0}" == 1 || "${SKIP_TRAIN:-0}" == 1 ]]; then
  train=()  # load the saved coresets and priors
fi
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
    echo "== $DATASET_CATEGORY $category, $backbone"
    "$PYTHON" train_coreset_distribution.py ${train[@]+"${train[@]}"} \
      --dataset_path "$DATASET_PATH" --dataset_category "$DATASET_CATEGORY" --category "$category" \
      --project_root_path "$RESULT_ROOT" --embedding_root_path "$EMBEDDING_ROOT" \
      --backbone "$backbone" --seed "$SEED" ${extra[@]+"${extra[@]}"}
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
"$PYTHON" analysis_code/convert_result_format.py ${ravel_flags[@]+"${ravel_flags[@]}"} \
  --before_result_root_dir "$ENSEMBLE_ROOT" --after_result_root_dir "$RAVEL_ROOT"
"$PYTHON" analysis_code/analysis_amap.py ${ravel_flags[@]+"${ravel_flags[@]}"} \
  --project_root_path "$RAVEL_ROOT" --visualize --calc_pro
echo "scores: $RESULT_ROOT/score_result.csv, $RESULT_ROOT/ensemble_score_result.csv, $RAVEL_ROOT/score_result.csv"
echo "pictures: $RAVEL_ROOT/viz/<category>/"
