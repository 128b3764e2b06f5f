#!/usr/bin/env bash
# MMMU dev (150 solved questions, 5 per subject) -> data/mmmu/dev/{shard-*.tar,manifest.json}.
# (validation and test are for `mmlatent eval`, not for training.)
#
#   bash datasets/mmmu/convert.sh                        # streamed from the Hub
#   SRC=/data/MMMU bash datasets/mmmu/convert.sh         # a local copy (one folder per subject)
set -euo pipefail
SRC="${SRC:-MMMU/MMMU}"
OUT="${OUT:-data/mmmu/dev}"
WORKERS="${WORKERS:-2}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m mmlatent data convert mmmu --source "$SRC" --split dev --out "$OUT" \
  --image_format png --max_image_size 1024 --samples_per_shard 50 --workers "$WORKERS" "$@"
