"""The 4-bit linear op (forward and input gradient) and the one place that decides which kernel
serves which batch."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _C
from ._torch import stream_of
from .quant_state import QuantState

# Batches up to this many rows take libfp4's fused GEMV on CUDA (it reads the 4-bit weight once);
# larger batches dequantize into a temporary and use cuBLAS. Measured on the H100 (fp16, nf4,
# `python -m fp4 bench`, CUDA graphs, weights beyond L2), (28672, 8192): GEMV 71 / 89 / 137 us at
# batch 1 / 2 / 4, where dequantize + cuBLAS (bitsandbytes' own path) costs ~365 us at any batch
# up to 16; (4096, 4096): GEMV 9 / 11 / 16 us against ~24-33 us. The GEMV's largest template is 8,
# and it still wins there (see the closing note of issue 3). The fused tensor-core GEMM (issue 4)
# is what will move this line further.
CUDA_GEMV_MAX_BATCH = 8

# The input gradient dequantizes the weight one slab of rows at a time, so training never holds a
# dense copy of a whole weight: at most this many elements (64 MiB in fp16) exist at once.
GRAD_SLAB_ELEMENTS = 1 << 25


class KernelArgs:
    """The arrays and options libfp4 needs for one quantized weight, prepared once (flat uint8
    codes, float32 scales, nested statistics) so a forward call does no per-call tensor plumbing.

    weight/absmax/nested_* follow bitsandbytes: with nested statistics `absmax` holds the uint8
    codes, `nested_absmax` their float32 scales, `nested_code` the 256-entry code and
    `nested_offset` the mean that was subtracted.
    """

    __slots__ = ("codes", "scales", "nested", "quant_type", "blocksize", "out_features", "in_features")

    def __init__(self, weight: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                 shape: Sequence[int], nested_absmax: Optional[torch.Tensor] = None,
                 nested_code: Optional[torch.Tensor] = None, nested_offset: Optional[torch.Tensor] = None,
                 nested_blocksize: int = 256):
        self.codes = (weight if weight.dtype == torch.uint8 else weight.view(torch.uint8)).reshape(-1)
        if nested_absmax is None:
            self.scales = absmax.float().contiguous()
            self.nested = {}
        else:
            self.scales = nested_absmax.float().contiguous()
            self.nested = dict(nested_codes=absmax, nested_code=nested_code.float().contiguous(),
                               nested_offset=nested_offset.float().reshape(1), nested_blocksize=int(nested_blocksize))
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.out_features, self.in_features = (int(d) for d in shape)

    @classmethod
    def of_state(cls, packed: torch.Tensor, state: QuantState) -> "KernelArgs":
        nested = state.nested
        return cls(packed, state.absmax, state.quant_type, state.blocksize, state.shape,
                   state.state2.absmax if nested else None, state.state2.code if nested else None,
                   state.offset if nested else None, state.state2.blocksize if nested else 256)

    def dequantize_rows(self, first: int, last: int, dtype: torch.dtype, scales: torch.Tensor) -> torch.Tensor:
        """Rows [first, last) of the dense weight, from `scales` = every block's float32 scale.
        `first * in_features` must start a block (so the slab's codes and scales are plain slices)."""
        k = self.in_features
        begin, end = first * k, last * k
        out = torch.empty(last - first, k, dtype=dtype, device=self.codes.device)
        first_block = begin // self.blocksize
        _C.dequantize_4bit(self.codes[begin // 2:(end + 1) // 2],
                           scales[first_block:first_block - (-(end - begin) // self.blocksize)],
                           out.reshape(-1), self.quant_type, self.blocksize, stream_of(out))
        return out


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None):
    """y = x @ W.T + bias, W the 4-bit weight of shape state.shape = (out_features, in_features).

    x: [..., in_features] float32/float16/bfloat16; the result has x's dtype and leading dims.
    """
    return linear_4bit_prepared(x, KernelArgs.of_state(packed, state), bias)


def linear_4bit_prepared(x: torch.Tensor, args: KernelArgs, bias: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None):
    """linear_4bit with the weight's arguments prepared by KernelArgs (what FP4Linear caches).
    `out`, when given, is a contiguous tensor of the result's shape and dtype to write into."""
    out_features, in_features = args.out_features, args.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    m = x2.shape[0]
    y = out if out is not None else torch.empty(*lead, out_features, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.device.type == "cuda" and m > CUDA_GEMV_MAX_BATCH:
        weight = torch.empty(out_features, in_features, dtype=x.dtype, device=x.device)
        _C.dequantize_4bit(args.codes, args.scales, weight.reshape(-1), args.quant_type, args.blocksize, stream_of(x),
                           **args.nested)
        if bias is None:
            torch.mm(x2, weight.t(), out=y.view(m, out_features))
        else:
            torch.addmm(bias, x2, weight.t(), out=y.view(m, out_features))
        return y
    _C.linear_4bit(x2.contiguous(), args.codes, args.scales, None if bias is None else bias.contiguous(),
                   y.view(m, out_features), args.quant_type, args.blocksize, stream_of(x), **args.nested)
    return y


def linear_4bit_grad_input(grad_out: torch.Tensor, args: KernelArgs) -> torch.Tensor:
    """dL/dx = grad_out @ W for y = x @ W.T: the weight is dequantized one slab of rows at a time
    (GRAD_SLAB_ELEMENTS at most) and each slab's product is accumulated, so no dense copy of the
    whole weight is ever held; each product runs on cuBLAS / torch's CPU GEMM."""
    out_features, in_features = args.out_features, args.in_features
    lead = grad_out.shape[:-1]
    g = grad_out.reshape(-1, out_features)
    if g.shape[0] == 0:
        return grad_out.new_zeros(*lead, in_features)
    scales = _block_scales(args)
    # Slabs hold a whole number of blocks: a multiple of `blocksize` rows always does.
    rows = max(args.blocksize, GRAD_SLAB_ELEMENTS // in_features // args.blocksize * args.blocksize)
    if rows >= out_features:
        return (g @ args.dequantize_rows(0, out_features, g.dtype, scales)).reshape(*lead, in_features)
    total = torch.zeros(g.shape[0], in_features, dtype=torch.float32, device=g.device)
    for first in range(0, out_features, rows):
        last = min(first + rows, out_features)
        total += g[:, first:last] @ args.dequantize_rows(first, last, g.dtype, scales)
    return total.to(g.dtype).reshape(*lead, in_features)


def _block_scales(args: KernelArgs) -> torch.Tensor:
    """Every block's float32 scale (nested statistics expanded)."""
    if not args.nested:
        return args.scales
    out = torch.empty(args.nested["nested_codes"].numel(), dtype=torch.float32, device=args.scales.device)
    _C.expand_absmax(args.scales, out, stream_of(out), **args.nested)
    return out


def dequantize_prepared(args: KernelArgs, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [out_features, in_features] in `dtype`."""
    out = torch.empty(args.out_features, args.in_features, dtype=dtype, device=args.codes.device)
    _C.dequantize_4bit(args.codes, args.scales, out.reshape(-1), args.quant_type, args.blocksize, stream_of(out),
                       **args.nested)
    return out
