#!/usr/bin/env bash
# Refine the "bottle" anomaly maps of an analysed ravel folder with the pixel-wise
# refinement model, then analyse the refined maps (run from the repository root after
# evaluate_amap_on_MVTecAD_*.sh has written ./result/ensemble_ravel).
#
#   REFINEMENT_CHECKPOINT  weights to use (default ./refinement_model/bottle.pt; the
#                          original's published refinement checkpoints load as they are)
#   TRAIN_REFINER=1        train a refiner first on synthetic defects pasted into the
#                          normal training images of bottle (a fair evaluation: the test
#                          set is never seen), written to REFINEMENT_CHECKPOINT
#   DATASET_PATH           dataset root (default ../dataset/MVTecAD)
#   PYTHON                 interpreter (default .venv/bin/python when it exists, else python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
DATASET_PATH=${DATASET_PATH:-../dataset/MVTecAD}
RESULT_ROOT=${RESULT_ROOT:-./result}
REFINEMENT_CHECKPOINT=${REFINEMENT_CHECKPOINT:-./refinement_model/bottle.pt}
CATEGORY=bottle

if [[ "${TRAIN_REFINER:-0}" == "1" ]]; then
  "$PYTHON" pixelwise_refinement.py --train --train_data synthetic \
    --normal_image_dir "$DATASET_PATH/$CATEGORY/train/good" \
    --checkpoint_path "$REFINEMENT_CHECKPOINT" ${REFINER_ARGS:-}
fi

"$PYTHON" pixelwise_refinement.py --category "$CATEGORY" \
  --input_data_path "$RESULT_ROOT/ensemble_ravel" --output_data_path "$RESULT_ROOT/ensemble_ravel_refined" \
  --checkpoint_path "$REFINEMENT_CHECKPOINT" ${REFINER_ARGS:-}
"$PYTHON" analysis_code/analysis_amap.py --project_root_path "$RESULT_ROOT/ensemble_ravel_refined" --calc_pro --visualize
"$PYTHON" -m pni.refinement.compare "$RESULT_ROOT/ensemble_ravel" "$RESULT_ROOT/ensemble_ravel_refined"
