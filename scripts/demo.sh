#!/usr/bin/env bash
# The demo behind `make demo`: build the small built-in dataset, run every PNI stage on
# each of its categories on the CPU, print the score tables, then run the analysis scripts
# (ensemble, ravel format, AUROC/AUPRO, pictures in $DEMO_ROOT/result/ensemble_ravel/viz/).
# A few minutes on 2 cores.
#
# Settings are scaled down from the paper's (see README, "The demo"): 128 px images,
# ResNet-18 (ImageNet weights when they are in the torch hub cache, else a randomly
# initialised one: nothing is downloaded), 256-dim features, 10% coreset, 128-entry
# distribution coreset, dp = 2, a 3-layer MLP trained for 4 epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEMO_ROOT=${DEMO_ROOT:-demo_output}
DATASET=$DEMO_ROOT/dataset
RESULT=$DEMO_ROOT/result
export MPLBACKEND=Agg

"$PY" -m pni.data.synthetic --output_path "$DATASET"

if "$PY" -c "import sys; from pni.features import hub_checkpoint_dir, weights_file_name; \
sys.exit(0 if (hub_checkpoint_dir() / weights_file_name('R18')).is_file() else 1)"; then
  WEIGHTS=()
  echo "demo: using ImageNet ResNet-18 weights from the torch hub cache"
else
  WEIGHTS=(--random_init)
  echo "demo: no ImageNet ResNet-18 weights in the torch hub cache: using a randomly initialised backbone"
fi

for CATEGORY in texture layered stripes; do
  "$PY" train_coreset_distribution.py --train_coreset --train_nb_dist --train_coor_dist \
    --dataset_path "$DATASET" --dataset_category MVTec --category "$CATEGORY" \
    --project_root_path "$RESULT" --embedding_root_path "$DEMO_ROOT" \
    --backbone R18 "${WEIGHTS[@]}" --resize 128 --imagesize 128 \
    --pretrain_embed_dimension 256 --target_embed_dimension 256 \
    --subsampling_percentage 0.1 --dist_coreset_size 128 --dist_padding 2 \
    --num_layers 3 --num_epochs 4 --step_size 3 --dist_batchsize 256 --blursigma 2 \
    --seed 22
done

"$PY" -m pni.report --project_root_path "$RESULT" --categories texture layered stripes --backbone R18

# Analysis as in the evaluate_amap_on_*.sh scripts: ensemble (R18 alone), ravel, scores + pictures.
"$PY" analysis_code/calc_ensemble_score.py --category texture layered stripes --backbone_list R18 \
  --project_root_path "$RESULT" --ensemble_root_path "$RESULT/ensemble_result"
"$PY" analysis_code/convert_result_format.py \
  --before_result_root_dir "$RESULT/ensemble_result" --after_result_root_dir "$RESULT/ensemble_ravel"
"$PY" analysis_code/analysis_amap.py --project_root_path "$RESULT/ensemble_ravel" --visualize --calc_pro
echo "demo: pictures (image, ground truth, heat map, heat map with the predicted region outlined in orange) in $RESULT/ensemble_ravel/viz/<category>/"
echo "      e.g. $RESULT/ensemble_ravel/viz/texture/*_heatmap_on_img_with_mask.png; index.csv there maps numbers to files"

# Refinement: a refiner trained on synthetic defects of the training images; before/after.
PY="$PY" DEMO_ROOT="$DEMO_ROOT" bash scripts/demo_refinement.sh

# Use on new images (README, "Use on your own images"): export the texture model as a bundle
# (thresholds calibrated on its good test images) and predict a few images with it.
"$PY" export_model.py --dataset_path "$DATASET" --dataset_category MVTec --category texture \
  --project_root_path "$RESULT" --embedding_root_path "$DEMO_ROOT" \
  --backbone R18 "${WEIGHTS[@]}" --resize 128 --imagesize 128 \
  --pretrain_embed_dimension 256 --target_embed_dimension 256 \
  --subsampling_percentage 0.1 --dist_coreset_size 128 --dist_padding 2 --num_layers 3 --blursigma 2 \
  --seed 22 --output "$DEMO_ROOT/model_texture"
"$PY" predict.py --model "$DEMO_ROOT/model_texture" --output "$DEMO_ROOT/predictions" \
  --input "$DATASET/texture/test/good/000.png" "$DATASET/texture/test/good/001.png" \
  "$DATASET/texture/test/hole/000.png" "$DATASET/texture/test/scratch/000.png" "$DATASET/texture/test/stain/000.png"
echo "demo: the model bundle is $DEMO_ROOT/model_texture; heat maps on the images (fixed colour scale, defects"
echo "      outlined) in $DEMO_ROOT/predictions/overlays/, defect masks in masks/, scores in predictions.csv"
