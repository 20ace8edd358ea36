#!/usr/bin/env bash
# Multi-GPU sparse fine-tuning (FSDP2 through accelerate) on random:llama-1b, SquareHead+KD+CE.
# Rows go to $RESULTS (JSON lines, written by rank 0): throughput on 1 GPU and on N GPUs with the
# same per-GPU batch; an fp32 one-GPU reference (grad_accum N); and the same global batch on N GPUs
# under FSDP2, killed after step 3 and resumed from the sharded checkpoint of step 2.
#   bash benchmarks/finetune_multigpu.sh OUT_DIR [N_GPUS]
set -euo pipefail
out=${1:?output directory}; n=${2:-2}
mkdir -p "$out"; RESULTS=$out/multigpu.jsonl
export PYTHONPATH=${PYTHONPATH:-src} PYTHONUNBUFFERED=1
bench="benchmarks/finetune.py speed --model random:llama-1b --no-progress --results $RESULTS"
speed="--batch-size 4 --seqlen 1024 --steps 8 --warmup-steps 2"
check="--batch-size 2 --seqlen 512 --steps 4 --precision fp32"
fsdp="accelerate launch --num_processes $n --num_machines 1 --use_fsdp --fsdp_version 2
      --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer
      --fsdp_state_dict_type SHARDED_STATE_DICT"
# one GPU: throughput on GPU 0 while the fp32 reference runs on GPU 1
CUDA_VISIBLE_DEVICES=0 python3 $bench $speed > "$out/speed_1gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 python3 $bench $check --grad-accum "$n" > "$out/ref_1gpu.log" 2>&1
wait
$fsdp $bench $speed > "$out/speed_${n}gpu.log" 2>&1
$fsdp $bench $check --checkpoint-every 2 --output-dir "$out/ckpt" --crash-at 3 > "$out/crash_${n}gpu.log" 2>&1 \
  && { echo "the run meant to crash did not"; exit 1; } || true
ls "$out/ckpt/checkpoints"
$fsdp $bench $check --checkpoint-every 2 --output-dir "$out/ckpt" --resume > "$out/resume_${n}gpu.log" 2>&1
rm -rf "$out/ckpt"
python3 - "$RESULTS" <<'PY'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    print(r["world_size"], r["distributed_type"], r["precision"], r["batch"], r["seqlen"], "start", r["start_step"],
          "tok/s", round(r["tokens_per_s"]), "steady", round(r["steady_tokens_per_s"] or 0),
          "peak GiB", round((r["peak_device_mib"] or 0) / 1024, 1), "masks", r["mask_check"]["identical"],
          "losses", [round(x, 6) for x in r["losses"]])
PY
