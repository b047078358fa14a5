#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md ("On a GPU in bfloat16") and docs/speed.md, in one run on a lent GPU:
# the CUDA tests, then bfloat16 latency (eager, CUDA graphs, torch.compile) of DeiT-B and DINOv2-S at batch 1 and
# 256, and the compress time of the no-fine-tune recipes. Each step has its own time limit, the cheapest first, so
# that a short lease still brings back the most important figures. Usage: bash benchmarks/gpu_bf16.sh OUT_DIR
set -u
out=${1:?give an output folder}
mkdir -p "$out"
export PYTHONPATH=$PWD OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 WANDB_MODE=offline LOWRANK_VIT_CACHE=/tmp/lowrank-cache
py=${PYTHON:-python3}
gpu=$($py -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
common=(--device cuda --dtype bfloat16 --target-speedup --repeats 5 --profile-repeats 3 --min-time 0.2 --calib 16)
if [ "${SKIP_TESTS:-0}" = 0 ]; then  # needs pytest beside the library's own packages (not datasets: ran on the H200 image)
    timeout 60 $py -m pytest -q -p no:cacheprovider -x -k "cuda or gpu or graphs" tests/speed/test_runtimes.py \
        tests/nn/test_quantize.py tests/test_pipeline.py tests/methods/test_compensate.py 2>&1 | tail -3
fi
timeout 160 $py benchmarks/latency.py --model deit_base "${common[@]}" --runtime torch cuda-graphs \
    --profile-runtime torch --batch-size 1 256 --reduction 0.5 0.7 --json "$out/latency_deit_base_${gpu}_bf16.json"
timeout 100 $py benchmarks/latency.py --model vit_small_patch14_dinov2 --model-kwargs '{"img_size": 224}' \
    "${common[@]}" --runtime torch cuda-graphs --profile-runtime torch --batch-size 1 256 --reduction 0.5 0.7 \
    --json "$out/latency_dinov2_small_${gpu}_bf16.json"
[ "${ONLY_LATENCY:-0}" = 1 ] || timeout 90 $py benchmarks/compress_time.py --model deit_small --calib 1024 --batch-size 64 --reduction 0.7 \
    --recipe loss-aware loss-aware-refit loss-aware-anchored loss-aware-block --repeats 1 --device cuda \
    --json "$out/compress_time_deit_small_no_finetune_${gpu}.json"
[ "${ONLY_LATENCY:-0}" = 1 ] || timeout 120 $py benchmarks/latency.py --model deit_base "${common[@]}" --runtime torch.compile \
    --profile-runtime torch --batch-size 256 --reduction 0.5 0.7 --json "$out/latency_deit_base_${gpu}_bf16_compile.json"
ls -la "$out"
