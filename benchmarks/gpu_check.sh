#!/usr/bin/env bash
# The GPU check of issue 24, for one GPU and under 10 minutes: every result one JSON line in $OUT.
#   1. benchmarks/gpu_throughput.py: stage-1 and stage-3 tokens/s and MFU of a ~0.5B composed VLM, bf16;
#   2. one real-recipe step at full size: Qwen2.5-VL-3B (random weights from its released configuration),
#      train/configs/qwen2_5_vl_3b/stage1.yaml through FSDP2Strategy on this GPU, 3 steps on Monet-layout
#      samples, with `mmlatent plan`'s prediction for the same settings beside the measured peak;
#   3. the FSDP2 path of the latent stages: the tiny model's stage 1 -> 2 (online teacher, latent-only
#      alignment) -> 3 under FSDP2Strategy on this GPU, a sharded checkpoint, a resume and an export.
# Without a GPU, 1 runs its --small check, 2 says it was skipped, and 3 runs on two CPU processes (gloo).
#   bash benchmarks/gpu_check.sh            # OUT=runs/gpu_check/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check/results.jsonl}
WORK=${WORK:-runs/gpu_check}
mkdir -p "$WORK" "$(dirname "$OUT")"
: > "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
GPU=$($PY -c 'import torch; print(int(torch.cuda.is_available()))')
record() { echo "$1" | tee -a "$OUT"; }

# 1. throughput and MFU (on a CPU: the script's --small check)
record "$($PY benchmarks/gpu_throughput.py | tail -n 1 | $PY -c 'import json,sys; d=json.load(sys.stdin); d["check"]="gpu_throughput"; print(json.dumps(d))')"

# 2. one full-size step of the real recipe
if [ "$GPU" = 1 ]; then
  $PY - "$WORK" <<'EOF'
import sys
from pathlib import Path
from mmlatent.data.layout_samples import write_layout_shards
from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer
from mmlatent.model.architectures import write_random_model
work = Path(sys.argv[1])
if not (work / "models/qwen2_5_vl_3b/config.json").is_file():
    write_random_model("Qwen/Qwen2.5-VL-3B-Instruct", work / "models/qwen2_5_vl_3b", build_synthetic_tokenizer(),
                       dtype="bfloat16", full_tokenizer=True)
for split, n in (("train", 48), ("val", 2)):
    if not (work / "data/layout" / split).is_dir():
        write_layout_shards(work / "data/layout" / split, n, seed=len(split), name=f"layout-{split}")
EOF
  GIB=$($PY -c 'import torch; print(int(torch.cuda.get_device_properties(0).total_memory / 2**30))')
  RECIPE=train/configs/qwen2_5_vl_3b/stage1.yaml
  SET=(--trainer.devices=1 --trainer.strategy=fsdp2 --trainer.max_steps=3 --trainer.limit_val_batches=0
       --trainer.num_sanity_val_steps=0 --trainer.accumulate_grad_batches=1 --trainer.enable_progress_bar=false
       --data.num_workers=2 --data.train.shards="$WORK/data/layout/train" --data.val.shards="$WORK/data/layout/val"
       --model.vlm.native.name_or_path="$WORK/models/qwen2_5_vl_3b" --model.vlm.tokenizer.name_or_path="$WORK/models/qwen2_5_vl_3b"
       --trainer.default_root_dir="$WORK/stage1")
  # the full fine-tune if the memory model says it fits one GPU, else the recipe's one-GPU LoRA setting
  FITS=$($PY -m mmlatent plan -c "$RECIPE" --gpu-memory "$GIB" --gpus 1 "${SET[@]}" | tail -n 1 | $PY -c 'import json,sys; print(int(json.load(sys.stdin)["fits"]))')
  [ "$FITS" = 1 ] || SET+=(--model.vlm.lora.enabled=true --model.optim.lr=2e-4)
  PLAN=$($PY -m mmlatent plan -c "$RECIPE" --gpu-memory "$GIB" --gpus 1 "${SET[@]}" | tail -n 1)
  rm -f "$WORK/probe.jsonl"
  $PY -m mmlatent fit -c "$RECIPE" "${SET[@]}" \
      --trainer.callbacks+="{\"class_path\": \"rehearsal_probe.StepProbe\", \"init_args\": {\"out\": \"$WORK/probe.jsonl\"}}" \
      > "$WORK/stage1.log" 2>&1 || { record "{\"check\": \"full_size_step\", \"ok\": false, \"log\": \"$WORK/stage1.log\"}"; exit 1; }
  record "$($PY - "$WORK/probe.jsonl" "$PLAN" <<'EOF'
import json, sys
steps = [json.loads(x) for x in open(sys.argv[1])]
plan = json.loads(sys.argv[2])
last = steps[-1]
print(json.dumps({"check": "full_size_step", "ok": True, "recipe": plan["recipe"], "overrides": plan["overrides"],
                  "seconds_per_step": [s["seconds"] for s in steps], "tokens_per_step": last["tokens"],
                  "peak_gpu_gib": round(last.get("peak_cuda_bytes", 0) / 2**30, 2),
                  "predicted_gib": plan["plan"]["total"], "largest_micro_batch": plan["largest_micro_batch"]}))
EOF
)"
else
  record '{"check": "full_size_step", "skipped": "no GPU on this machine"}'
fi

# 3. the FSDP2 path of every stage (tiny model): the distributed tests' harness
ACCEL=$([ "$GPU" = 1 ] && echo gpu || echo cpu)
$PY -m pytest -q -p no:cacheprovider tests/training/test_fsdp2.py -k "trains_like_one_process or resumes or exports" \
    > "$WORK/fsdp2.log" 2>&1 && OK=true || OK=false
record "{\"check\": \"fsdp2_stages\", \"ok\": $OK, \"accelerator\": \"cpu (gloo, 2 processes)\", \"log\": \"$WORK/fsdp2.log\"}"
if [ "$GPU" = 1 ]; then
  rm -rf "$WORK/tiny" && mkdir -p "$WORK/tiny"
  ( cd "$WORK/tiny" && $PY -m mmlatent data synth --out data/synth --train 32 --val 8 > synth.log 2>&1
    for STAGE in stage1 stage2 stage3; do
      $PY -m mmlatent fit -c "$OLDPWD/train/configs/tiny/$STAGE.yaml" --trainer.accelerator=gpu --trainer.devices=1 \
          --trainer.strategy=fsdp2 --trainer.precision=bf16-mixed --trainer.max_steps=4 --trainer.limit_val_batches=0 \
          --data.batch_size=8 --data.num_workers=0 > "$STAGE.log" 2>&1
    done
    $PY -m mmlatent export runs/tiny/stage3/checkpoints/last.ckpt export > export.log 2>&1 ) && OK=true || OK=false
  record "{\"check\": \"fsdp2_stages_gpu\", \"ok\": $OK, \"accelerator\": \"$ACCEL\", \"log\": \"$WORK/tiny\"}"
fi
