#!/usr/bin/env bash
# One device call: the whole test suite on the GPU, the main job, the benchmark, compute-sanitizer.
# Usage (device tool): source .device/setup.sh && bash tools/gpu_validate.sh
set -o pipefail
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python -m pytest -q tests -p no:logging -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v "^  File" | tail -8
python -m fp4 bench --batches 1 --dtypes float16,bfloat16 --formats fp4,nf4 --repeats 50 --json "$OUT/bench_b1.json" 2>&1 \
  | grep -v kernels-community | tee "$OUT/bench.log"
python -m fp4 bench --shapes 28672x8192,4096x4096 --batches 2,4,8,16 --dtypes float16,bfloat16 --formats nf4 \
  --repeats 30 --json "$OUT/bench_small_batch.json" 2>&1 | grep -v kernels-community | tee -a "$OUT/bench.log"
python -m fp4 check 2>&1 | grep -v kernels-community > "$OUT/check.log"; tail -12 "$OUT/check.log"
timeout 240 compute-sanitizer --tool memcheck --print-limit 5 python -m pytest -q -x tests/test_linear.py \
  tests/test_bnb_exact.py -k "cuda and (forward or odd or plain-torch.float16-64)" -p no:cacheprovider 2>&1 | tail -4
