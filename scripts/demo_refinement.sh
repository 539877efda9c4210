#!/usr/bin/env bash
# Demo step of the refinement model (called by scripts/demo.sh after the analysis):
# train a refiner on synthetic defects pasted into the demo's *training* images (the test
# set is never seen), refine the demo's ravel maps, and compare P-AUROC / AUPRO before and
# after. Small settings (128 px input, 3 epochs) so it runs in a couple of minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_ROOT=${DEMO_ROOT:-demo_output}
DATASET=$DEMO_ROOT/dataset
RESULT=$DEMO_ROOT/result
VERBOSE_FLAG=()
if [ -n "${VERBOSE:-}" ]; then VERBOSE_FLAG=(--verbose); fi

"$PY" pixelwise_refinement.py --train --train_data synthetic \
  --normal_image_dir "$DATASET/texture/train/good" "$DATASET/layered/train/good" "$DATASET/stripes/train/good" \
  --image_size 128 --num_epochs 3 --batch_size 8 --samples_per_image 2 --accelerator cpu \
  --checkpoint_path "$DEMO_ROOT/refinement_model.pt" \
  --input_data_path "$RESULT/ensemble_ravel" --output_data_path "$RESULT/ensemble_ravel_refined" \
  "${VERBOSE_FLAG[@]}"
"$PY" analysis_code/analysis_amap.py --project_root_path "$RESULT/ensemble_ravel_refined" --calc_pro > /dev/null
"$PY" -m pni.refinement.compare "$RESULT/ensemble_ravel" "$RESULT/ensemble_ravel_refined"
