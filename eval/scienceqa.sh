#!/usr/bin/env bash
# ScienceQA test: the image subset (2,017 questions) and the full set (4,241), official breakdowns
# (NAT SOC LAN / TXT IMG NO / G1-6 G7-12 / Avg), written to OUT/img and OUT/full, scored by LLaVA's
# eval_science_qa.py rules unless --protocol says otherwise (scienceqa: the authors' "The answer is X.").
#   eval/scienceqa.sh MODEL OUT [mmlatent eval options]   e.g. --data /data/ScienceQA, --no-latent, --protocol scienceqa
set -euo pipefail
usage="usage: eval/scienceqa.sh MODEL OUT [options]"
model=${1:?$usage}
out=${2:?$usage}
shift 2
for subset in img full; do
  mmlatent eval --task scienceqa --data derek-thomas/ScienceQA --split test --subset "$subset" \
    --model "$model" --output "$out/$subset" --batch-size 16 --max-new-tokens 128 "$@"
done
