#!/usr/bin/env bash
# Monet-SFT-125K -> one shard set per subset, data/monet/<subset>/{shard-*.tar,manifest.json}.
# datasets/monet/mixture.yaml then streams the six sets as one training mixture.
#
#   bash datasets/monet/convert.sh                                   # from the Hub (downloaded to the HF cache once)
#   SRC=/data/Monet-SFT-125K bash datasets/monet/convert.sh          # from a local copy
#   bash datasets/monet/convert.sh --limit 200                       # extra options go to every conversion
#
# Re-running resumes an interrupted subset and skips finished ones. Sample keys are monet-<subset>-<sample_id>,
# unique across the six sets, so `mmlatent teacher --shards data/monet/*` caches them together. Why a record
# was skipped: data/monet/<subset>/skips.jsonl.
set -euo pipefail
SRC="${SRC:-NOVAglow646/Monet-SFT-125K}"
OUT="${OUT:-data/monet}"
WORKERS="${WORKERS:-8}"
PYTHON="${PYTHON:-python}"
for subset in Visual_CoT CogCoM ReFocus Zebra_CoT_count Zebra_CoT_visual_search Zebra_CoT_geometry; do
  "$PYTHON" -m mmlatent data convert monet \
    --source "$SRC" --files "[$subset/train.json]" --out "$OUT/$subset" \
    --image_format jpeg --max_image_size 1024 --samples_per_shard 1000 --workers "$WORKERS" "$@"
done
