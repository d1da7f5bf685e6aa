python -m pytest -q -x tests/test_cuda_kernels.py -p no:cacheprovider 2>&1 | tail -2
timeout 200 compute-sanitizer --tool racecheck --print-limit 3 python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k "gemm_large or random_shapes or (gemm_matches and 17 and float16)" 2>&1 | tail -2
timeout 200 compute-sanitizer --tool memcheck --print-limit 3 python -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py -k "gemm_large or random_shapes or (gemm_matches and 17 and float16)" 2>&1 | tail -2
python -m fp4 bench --shapes 28672x8192,4096x14336,14336x4096 --batches 4,16,64 --dtypes float16 --formats nf4 --repeats 15 --no-peers 2>&1 | grep -E "^ +[0-9]+x" | awk '{print $1, $2, $8}'
