#!/usr/bin/env bash
# The GPU acceptance run, in two device calls (each under the 10-minute limit):
#   source .device/setup.sh && bash tools/gpu_validate.sh tests    # test suite + compute-sanitizer
#   source .device/setup.sh && bash tools/gpu_validate.sh bench    # benchmarks (docs/) + python -m fp4 check
set -o pipefail
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
case "${1:-tests}" in
tests)
  python -m pytest -q -rs tests -p no:logging -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v "^  File" | tail -25
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    timeout 200 compute-sanitizer --tool $tool --print-limit 5 python -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda_kernels.py -k "gemm_large or random_shapes or (gemm_matches and 17 and float16)" \
      tests/test_linear.py -k "cuda and forward and float16" 2>&1 | tail -3
  done
  ;;
bench)
  python -m fp4 bench --shapes 28672x8192,14336x4096,4096x14336,4096x4096 --batches 1,4,16,64,256,1024 \
    --dtypes float16,bfloat16 --formats nf4 --repeats 20 --json "$OUT/h100_batches.json" 2>&1 \
    | grep -v kernels-community | tee "$OUT/bench.log"
  python -m fp4 bench --shapes 28672x8192,14336x4096,4096x14336,4096x4096 --batches 1 \
    --dtypes float16,bfloat16 --formats fp4 --repeats 20 --json "$OUT/h100_fp4_batch1.json" 2>&1 \
    | grep -v kernels-community | tee -a "$OUT/bench.log"
  python -m fp4 check 2>&1 | grep -v kernels-community > "$OUT/check.log"; tail -12 "$OUT/check.log"
  ;;
esac
