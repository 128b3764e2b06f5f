#!/usr/bin/env bash
# MMMU with the official answer parsing: validation by default (900 questions, scored), or the test split
# (answers hidden: results.json counts questions and unparsed answers, submission.json is the file to upload).
#   eval/mmmu.sh MODEL OUT [mmlatent eval options]   e.g. --split test, --data /data/MMMU, --no-latent
# MODEL: a Lightning .ckpt, an exported folder or a Hub id. Later options override the ones below.
set -euo pipefail
usage="usage: eval/mmmu.sh MODEL OUT [options]"
model=${1:?$usage}
out=${2:?$usage}
shift 2
exec mmlatent eval --task mmmu --data MMMU/MMMU --split validation --model "$model" --output "$out" \
  --batch-size 16 --max-new-tokens 128 "$@"
