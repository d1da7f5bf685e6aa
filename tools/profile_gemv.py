"""Run FP4Linear's GEMV on (28672, 8192) a few times, for ncu."""
import torch, fp4
from torch import nn
lin = nn.Linear(8192, 28672, bias=False, device="cuda", dtype=torch.float16)
layer = fp4.FP4Linear.from_linear(lin, "nf4")
x = torch.randn(1, 8192, device="cuda", dtype=torch.float16)
for _ in range(5):
    layer(x)
torch.cuda.synchronize()
