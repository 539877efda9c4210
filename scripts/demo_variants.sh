#!/usr/bin/env bash
# After `make demo`: the demo's categories under the three ways of computing PNI that
# README's "Reproducing the published numbers" compares:
#   --variant original --mask_workers 8   the published code (what `make demo` ran)
#   --variant original --mask_workers 1   the same code without its lost parallel writes
#   --variant paper                       the method as the paper describes it
# The first reads demo_output/result; the second re-scores the demo's saved artefacts (no
# training); the third trains its own neighbourhood MLP (its window layout differs) beside
# copies of the demo's coresets and position priors. Prints one table per setting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_ROOT=${DEMO_ROOT:-demo_output}
DATASET=$DEMO_ROOT/dataset
CATEGORIES=(texture layered stripes board)
OUT=$DEMO_ROOT/variants
if [[ ! -d "$DEMO_ROOT/result" ]]; then
  echo "error: $DEMO_ROOT/result not found: run make demo first" >&2
  exit 2
fi
eval "$(sed -n '/^PNI_FLAGS=(/,/)$/p' scripts/demo.sh)"  # the demo's settings, from the one place they live
WEIGHTS=(--random_init)
if "$PY" -c "import sys; from pni.features import hub_checkpoint_dir, weights_file_name; \
sys.exit(0 if (hub_checkpoint_dir() / weights_file_name('R18')).is_file() else 1)"; then
  WEIGHTS=()
fi
rm -rf "$OUT"
mkdir -p "$OUT/paper"
cp -r "$DEMO_ROOT"/embeddings_* "$OUT/paper/"
for CATEGORY in "${CATEGORIES[@]}"; do
  common=(--dataset_path "$DATASET" --dataset_category MVTec --category "$CATEGORY" "${PNI_FLAGS[@]}" "${WEIGHTS[@]}")
  "$PY" train_coreset_distribution.py "${common[@]}" --embedding_root_path "$DEMO_ROOT" \
    --project_root_path "$OUT/original_1" --variant original --mask_workers 1 > /dev/null
  "$PY" train_coreset_distribution.py "${common[@]}" --embedding_root_path "$OUT/paper" --train_nb_dist \
    --project_root_path "$OUT/paper/result" --variant paper > /dev/null
  echo "$CATEGORY: scored under --mask_workers 1 and --variant paper"
done
for ROOT in "$DEMO_ROOT/result" "$OUT/original_1" "$OUT/paper/result"; do
  "$PY" -m pni.report --project_root_path "$ROOT" --categories "${CATEGORIES[@]}" --backbone R18 | sed -n '1,/^$/p'
done
