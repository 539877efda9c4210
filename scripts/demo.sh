#!/usr/bin/env bash
# The demo behind `make demo`: build the small built-in dataset, run every PNI stage on
# each of its categories on the CPU, print the score tables, then run the analysis scripts
# (ensemble, ravel format, AUROC/AUPRO, pictures in $DEMO_ROOT/result/ensemble_ravel/viz/)
# and the refinement step. A few minutes on 2 cores.
#
# Settings are scaled down from the paper's (see README, "The demo"): 128 px images,
# ResNet-18 (ImageNet weights when they are in the torch hub cache, else a randomly
# initialised one: nothing is downloaded), layer2 features aggregated over 3x3 cells,
# 256 dimensions, 10% coreset, 128-entry distribution coreset, dp = 1, a 3-layer MLP
# trained for 4 epochs. Why layer2, 3x3 and dp = 1 at 128 px: README, "The demo".
# Each step prints one line (and one progress bar); add VERBOSE=1 to see everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_ROOT=${DEMO_ROOT:-demo_output}
DATASET=$DEMO_ROOT/dataset
RESULT=$DEMO_ROOT/result
CATEGORIES=(texture layered stripes board)
VERBOSE_FLAG=()
if [ -n "${VERBOSE:-}" ]; then VERBOSE_FLAG=(--verbose); fi
export MPLBACKEND=Agg

banner() { printf '\n==== %s ====\n' "$1"; }

banner "dataset"
# --overwrite: the demo owns this folder; a dataset of an older demo is rebuilt in place
"$PY" -m pni.data.synthetic --output_path "$DATASET" --overwrite

if "$PY" -c "import sys; from pni.features import hub_checkpoint_dir, weights_file_name; \
sys.exit(0 if (hub_checkpoint_dir() / weights_file_name('R18')).is_file() else 1)"; then
  WEIGHTS=()
  echo "demo: using ImageNet ResNet-18 weights from the torch hub cache"
else
  WEIGHTS=(--random_init)
  echo "demo: no ImageNet ResNet-18 weights in the torch hub cache: using a randomly initialised backbone"
fi

# The demo's PNI settings, in one place (tests/test_position_defect.py reads them from here;
# a later step that loads the trained artefacts must pass the same ones).
PNI_FLAGS=(--backbone R18 --resize 128 --imagesize 128 --layer_index layer2 --patchsize 3
  --pretrain_embed_dimension 256 --target_embed_dimension 256
  --subsampling_percentage 0.1 --dist_coreset_size 128 --dist_padding 1
  --num_layers 3 --num_epochs 4 --step_size 3 --dist_batchsize 256 --blursigma 2 --seed 22)

banner "PNI on each category: coresets, neighbourhood MLP, position priors, scoring"
for CATEGORY in "${CATEGORIES[@]}"; do
  "$PY" train_coreset_distribution.py --train_coreset --train_nb_dist --train_coor_dist \
    --dataset_path "$DATASET" --dataset_category MVTec --category "$CATEGORY" \
    --project_root_path "$RESULT" --embedding_root_path "$DEMO_ROOT" \
    "${PNI_FLAGS[@]}" "${WEIGHTS[@]}" "${VERBOSE_FLAG[@]}"
done

banner "what each map catches: PNI's maps (nb, coor, nb_coor) against plain PatchCore"
"$PY" -m pni.report --project_root_path "$RESULT" --categories "${CATEGORIES[@]}" --backbone R18

# Analysis as in the evaluate_amap_on_*.sh scripts: ensemble (R18 alone), ravel, scores + pictures.
banner "analysis scripts of the original project: ensemble, ravel folder, AUROC / AUPRO, pictures"
"$PY" analysis_code/calc_ensemble_score.py --category "${CATEGORIES[@]}" --backbone_list R18 \
  --project_root_path "$RESULT" --ensemble_root_path "$RESULT/ensemble_result" "${VERBOSE_FLAG[@]}"
"$PY" analysis_code/convert_result_format.py "${VERBOSE_FLAG[@]}" \
  --before_result_root_dir "$RESULT/ensemble_result" --after_result_root_dir "$RESULT/ensemble_ravel"
"$PY" analysis_code/analysis_amap.py --project_root_path "$RESULT/ensemble_ravel" --visualize --calc_pro \
  "${VERBOSE_FLAG[@]}"
echo "demo: pictures (image, ground truth, heat map, heat map with the predicted region outlined in orange) in $RESULT/ensemble_ravel/viz/<category>/"
echo "      e.g. $RESULT/ensemble_ravel/viz/board/*_heatmap_on_img_with_mask.png; index.csv there maps numbers to files"

# Refinement: a refiner trained on synthetic defects of the training images; before/after.
banner "refinement model (trained on synthetic defects of the training images only)"
PY="$PY" DEMO_ROOT="$DEMO_ROOT" VERBOSE="${VERBOSE:-}" bash scripts/demo_refinement.sh

# Use on new images (README, "Use on your own images"): new board images (another seed of the
# generator) stand for a production line's; the model is exported as a bundle with thresholds
# calibrated on 16 of its good images (never seen in training), then predicts the others.
banner "use on new images: export the board model, predict new images"
"$PY" -m pni.data.synthetic --output_path "$DEMO_ROOT/new_images" --categories board --seed 1 --overwrite
"$PY" export_model.py --dataset_path "$DATASET" --dataset_category MVTec --category board \
  --project_root_path "$RESULT" --embedding_root_path "$DEMO_ROOT" \
  "${PNI_FLAGS[@]}" "${WEIGHTS[@]}" "${VERBOSE_FLAG[@]}" --output "$DEMO_ROOT/model_board" \
  --calibration_dir "$DEMO_ROOT/new_images/board/train/good" --onnx
"$PY" predict.py --model "$DEMO_ROOT/model_board" --output "$DEMO_ROOT/predictions" "${VERBOSE_FLAG[@]}" \
  --input "$DEMO_ROOT/new_images/board/test"
echo "demo: the model bundle is $DEMO_ROOT/model_board; heat maps on the images (fixed colour scale, defects"
echo "      outlined) in $DEMO_ROOT/predictions/overlays/, defect masks in masks/, scores in predictions.csv"

# The same without PyTorch (README, "Deploy without PyTorch"): the bundle's model.onnx through onnxruntime.
banner "use on new images without PyTorch: predict.py --runtime onnxruntime"
"$PY" predict.py --model "$DEMO_ROOT/model_board" --output "$DEMO_ROOT/predictions_onnxruntime" \
  "${VERBOSE_FLAG[@]}" --input "$DEMO_ROOT/new_images/board/test" --runtime onnxruntime

printf '\ndemo: done in %d min %02d s; everything is under %s/\n' $((SECONDS / 60)) $((SECONDS % 60)) "$DEMO_ROOT"
