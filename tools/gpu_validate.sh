#!/usr/bin/env bash
# The GPU acceptance run: test suite, compute-sanitizer on the CUDA kernel tests, benchmarks (JSON
# for docs/), and the main job. Each part fits the device tool's 10-minute limit on its own (all
# together do not): source .device/setup.sh && bash tools/gpu_validate.sh [tests|sanitize|bench|all]
# TOOLS="memcheck synccheck" (or racecheck) runs only those sanitizers; PART="a -k expression" only the
# tests of their selections it also matches. Racecheck's whole selection outgrew one device command
# (122 of its 274 tests in 500 s on the H100; the whole-tiles tests take 26-46 s each), so it runs in
# two: PART="stream or whole or finish" and PART="not (stream or whole or finish)".
set -o pipefail
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
what=${1:-all}
if [ "$what" = tests ] || [ "$what" = all ]; then
  python -m pytest -q -rs tests -p no:logging -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v "^  File" | tail -8
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
  # (one -k expression: pytest keeps only the last -k it is given). racecheck also reports cuBLAS's
  # own kernels (nvjet_*, run by the dequantize + cuBLAS path): counted apart, they are not ours.
  # (racecheck once skipped the warp-specialized kernel's tests, its reports taken for false; they
  # were a real race: the pair-table fill was not ordered before the first lookups.)
  kernels="gemm_large or random_shapes or stream_ranges or unaligned_absmax or \
    (gemm_matches and (3 or 9 or 17 or 65) and float16) or (wgmma and float16 and (17 or 40)) or \
    wgmma_nested or (cuda and forward and float16) or \
    (stream_forms_match and float16) or whole_tiles or finish_in_half or chained_layers or two_rows_per_warp or \
    (gemv_pair_table and not where_chosen)"
  warp_specialized="(wgmma_gemm_matches and float16 and (65 or 128 or 130 or 257 or 300 or ws)) or identical_bits or \
    stream_forms_match or shares_the_last_wave or stores_y_in_pieces or walkers or splits_k_in_clusters or \
    beside_the_clusters or batch_16_tile"
  for tool in ${TOOLS:-memcheck racecheck synccheck}; do
    case $tool in
      memcheck) selection="$kernels or $warp_specialized" ;;
      racecheck) selection="$kernels or (wgmma_gemm_matches and float16 and (65 or 130 or 300)) or \
        (shares_the_last_wave and shared and not b1024) or (stores_y_in_pieces and float16) or walkers or splits_k_in_clusters or \
        (beside_the_clusters and not 14336) or (batch_16_tile and bf16)" ;;  # (time)
      synccheck) selection="$warp_specialized" ;;
    esac
    [ -n "$PART" ] && selection="($selection) and ($PART)"
    case $tool in memcheck) limit=150 ;; racecheck) limit=500 ;; synccheck) limit=90 ;; esac  # (racecheck: one PART per command, above)
    timeout $limit compute-sanitizer --tool $tool --print-limit 200 python -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda_kernels.py tests/test_linear.py -k "$selection" > "$OUT/$tool.log" 2>&1
    [ $? = 124 ] && echo "$tool: TIMED OUT after $limit s: incomplete, not clean (see $OUT/$tool.log)"
    # (a failure's count leads the summary line: "1 failed, 20 passed")
    grep -o "[0-9]* failed.*\|[0-9]* passed.*\|=* [A-Z]* SUMMARY.*" "$OUT/$tool.log" | sed "s/^/$tool: /"
    if [ $tool = racecheck ]; then
      echo "racecheck: hazards in fp4's kernels: $(grep "Race reported" "$OUT/$tool.log" | grep -vc nvjet)," \
        "in cuBLAS's: $(grep "Race reported" "$OUT/$tool.log" | grep -c nvjet)"
    fi
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python -m fp4 bench --shapes 28672x8192,14336x4096,4096x14336,4096x4096 --batches 1,4,16,64,128,256,512,1024 \
    --dtypes float16,bfloat16 --formats nf4 --repeats 20 --json "$OUT/h100_batches.json" 2>&1 \
    | grep -v "kernels-community\|SyntaxWarning\|Configuration class" | tee "$OUT/bench.log"
  python -m fp4 bench --shapes 28672x8192,14336x4096,4096x14336,4096x4096 --batches 1,16 \
    --dtypes float16,bfloat16 --formats fp4 --repeats 20 --json "$OUT/h100_fp4_format.json" 2>&1 \
    | grep -v "kernels-community\|SyntaxWarning\|Configuration class" | tee -a "$OUT/bench.log"
  python -m fp4 check 2>&1 | grep -v kernels-community > "$OUT/check.log"; tail -12 "$OUT/check.log"
fi
