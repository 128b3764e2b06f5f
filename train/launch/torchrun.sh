#!/usr/bin/env bash
# Multi-GPU / multi-node training with torchrun (one process per GPU). Run the same command on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 bash train/launch/torchrun.sh -c train/configs/qwen2_5_vl_3b/stage1.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 GPUS=8 bash train/launch/torchrun.sh -c train/configs/qwen2_5_vl_3b/stage1.yaml
#
# Every argument after the script is passed to `mmlatent fit` (configs, overrides, --ckpt_path=last to resume).
# Lightning reads the ranks torchrun sets; --trainer.num_nodes/devices are set here, after the configs (a later
# config would override them), so they always match the processes torchrun starts.
# Each rank reads its own planned range of the shards (every sample once per epoch, equal steps per rank).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS=${GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}   # per process; data-loader workers are separate processes

exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m mmlatent fit "$@" --trainer.num_nodes="$NNODES" --trainer.devices="$GPUS"
