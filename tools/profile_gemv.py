"""Run one fp4 CUDA kernel on (28672, 8192) a few times, for ncu.
Usage: python tools/profile_gemv.py [gemv|gemm|dequantize_matmul] [batch]"""
import sys

import torch
from torch import nn

import fp4
from fp4 import ops

kernel = sys.argv[1] if len(sys.argv) > 1 else "gemv"
batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
lin = nn.Linear(8192, 28672, bias=False, device="cuda", dtype=torch.float16)
layer = fp4.FP4Linear.from_linear(lin, "nf4")
args = ops.KernelArgs.of_state(layer.weight, layer.quant_state)
x = torch.randn(batch, 8192, device="cuda", dtype=torch.float16)
for _ in range(5):
    ops.linear_4bit_prepared(x, args, kernel=kernel)
torch.cuda.synchronize()
