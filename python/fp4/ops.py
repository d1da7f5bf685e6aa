"""The 4-bit linear op and the one place that decides which kernel serves which batch."""

from __future__ import annotations

from typing import Optional

import torch

from . import _C
from ._torch import stream_of
from .functional import _nested_args, _scales_of
from .quant_state import QuantState

# Batches up to this many rows take libfp4's fused GEMV on CUDA (it reads the 4-bit weight once);
# larger batches dequantize into a temporary and use cuBLAS. Measured on the H100 (fp16, nf4,
# `python -m fp4 bench`, CUDA graphs, weights beyond L2), (28672, 8192): GEMV 71 / 89 / 137 us at
# batch 1 / 2 / 4, where dequantize + cuBLAS (bitsandbytes' own path) costs ~365 us at any batch
# up to 16; (4096, 4096): GEMV 9 / 11 / 16 us against ~24-33 us. The GEMV's largest template is 8,
# and it still wins there (see the closing note of issue 3). The fused tensor-core GEMM (issue 4)
# is what will move this line further.
CUDA_GEMV_MAX_BATCH = 8


class KernelArgs:
    """The arrays and options libfp4 needs for one quantized weight, prepared once (flat uint8
    codes, float32 scales, nested statistics) so a forward call does no per-call tensor plumbing."""

    __slots__ = ("codes", "scales", "nested", "quant_type", "blocksize", "out_features", "in_features")

    def __init__(self, packed: torch.Tensor, state: QuantState):
        self.codes = packed.view(torch.uint8).reshape(-1)
        self.scales = _scales_of(state)
        self.nested = _nested_args(state)
        self.quant_type = state.quant_type
        self.blocksize = int(state.blocksize)
        self.out_features, self.in_features = (int(d) for d in state.shape)


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None):
    """y = x @ W.T + bias, W the 4-bit weight of shape state.shape = (out_features, in_features).

    x: [..., in_features] float32/float16/bfloat16; the result has x's dtype and leading dims.
    """
    return linear_4bit_prepared(x, KernelArgs(packed, state), bias)


def linear_4bit_prepared(x: torch.Tensor, args: KernelArgs, bias: Optional[torch.Tensor] = None):
    """linear_4bit with the weight's arguments prepared by KernelArgs (what FP4Linear caches)."""
    out_features, in_features = args.out_features, args.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*lead, out_features)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.device.type == "cuda" and m > CUDA_GEMV_MAX_BATCH:
        weight = torch.empty(out_features, in_features, dtype=x.dtype, device=x.device)
        _C.dequantize_4bit(args.codes, args.scales, weight.reshape(-1), args.quant_type, args.blocksize, stream_of(x),
                           **args.nested)
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x2.contiguous()
    y = torch.empty(m, out_features, dtype=x.dtype, device=x.device)
    _C.linear_4bit(x2, args.codes, args.scales, None if bias is None else bias.contiguous(), y, args.quant_type,
                   args.blocksize, stream_of(x), **args.nested)
    return y.reshape(*lead, out_features)
