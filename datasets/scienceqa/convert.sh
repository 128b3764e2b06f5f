#!/usr/bin/env bash
# ScienceQA train and validation -> data/scienceqa/{train,validation}/{shard-*.tar,manifest.json}.
# (The test split is for `mmlatent eval`, not for training.)
#
#   bash datasets/scienceqa/convert.sh                         # streamed from the Hub
#   SRC=/data/ScienceQA bash datasets/scienceqa/convert.sh     # a local copy (data/SPLIT-*.parquet)
#   bash datasets/scienceqa/convert.sh --image_only true        # only questions with an image
set -euo pipefail
SRC="${SRC:-derek-thomas/ScienceQA}"
OUT="${OUT:-data/scienceqa}"
WORKERS="${WORKERS:-4}"
PYTHON="${PYTHON:-python}"
for split in train validation; do
  "$PYTHON" -m mmlatent data convert scienceqa --source "$SRC" --split "$split" --out "$OUT/$split" \
    --image_format png --max_image_size 1024 --samples_per_shard 1000 --workers "$WORKERS" "$@"
done
