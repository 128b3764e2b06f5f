#!/usr/bin/env bash
# Zebra-CoT -> data/zebra_cot/{shard-*.tar,manifest.json} (all categories, streamed from parquet).
#
#   bash datasets/zebra_cot/convert.sh                                        # streamed from the Hub
#   SRC=/data/Zebra-CoT bash datasets/zebra_cot/convert.sh                    # a local copy of the repository
#   bash datasets/zebra_cot/convert.sh --files '["2D Visual Reasoning - Visual Search/*.parquet"]' \
#        --out data/zebra_cot_visual_search                                   # one category
#
# Re-running resumes an interrupted conversion. Keys are zebra_cot-<category>-<file>-<row>, so categories
# converted apart can be mixed and teacher-cached together; skipped records are listed in OUT/skips.jsonl.
set -euo pipefail
SRC="${SRC:-multimodal-reasoning-lab/Zebra-CoT}"
OUT="${OUT:-data/zebra_cot}"
WORKERS="${WORKERS:-8}"
PYTHON="${PYTHON:-python}"
"$PYTHON" -m mmlatent data convert zebra_cot --source "$SRC" --out "$OUT" \
  --image_format jpeg --max_image_size 1024 --samples_per_shard 1000 --workers "$WORKERS" "$@"
