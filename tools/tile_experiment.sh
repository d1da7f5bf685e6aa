for tile in default 1x8 2x4 4x2; do
  FP4_GEMM_TILE_EXPERIMENT=$tile python -m fp4 bench --shapes 28672x8192,4096x14336 --batches 48,64 --dtypes float16 \
    --formats nf4 --repeats 15 --no-peers 2>&1 | grep -E "^ +[0-9]+x" | awk -v t=$tile '{print t, $1, $2, $9}'
done
python - <<'PY' 2>&1 | tail -4
import torch
from torch import nn
from torchao.quantization import Int4WeightOnlyConfig, quantize_
m = nn.Sequential(nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16))
quantize_(m, Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d"))
print(type(m[0].weight).__name__, m(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)).shape)
PY
