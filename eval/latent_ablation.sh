#!/usr/bin/env bash
# The same model with latent reasoning on and off, on one benchmark, side by side in OUT/latent and
# OUT/no-latent; prints both summary lines.
#   eval/latent_ablation.sh TASK MODEL OUT [mmlatent eval options]   TASK: mmmu | scienceqa
set -euo pipefail
usage="usage: eval/latent_ablation.sh TASK MODEL OUT [options]"
task=${1:?$usage}
model=${2:?$usage}
out=${3:?$usage}
shift 3
for mode in latent no-latent; do
  mmlatent eval --task "$task" --model "$model" --output "$out/$mode" --"$mode" "$@" | tail -n 1
done
