"""The 4-bit linear op (forward and input gradient) and the one place that decides which kernel
serves which batch."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import _C
from ._torch import check_float_dtype, dlpack_of, stream_of
from .quant_state import QuantState

# Which CUDA kernel serves which batch (fp16/bf16 activations, in_features % 128 == 0 and aligned
# buffers; otherwise the GEMV to GEMV_CHUNKED_MAX_BATCH, then dequantize + cuBLAS):
#   m <= 2 with at most CUDA_GEMV_MAX_WEIGHTS[m] weights (with rows at least CUDA_GEMV_LONG_ROWS times
#   as long as there are rows: at most CUDA_GEMV_LONG_ROWS_MAX_WEIGHTS[m], a warp per row being too few)
#                                 the fused GEMV (warp per output feature; at batch 1 in fp16/bf16 on
#                                 >= 2^24 weights its pair-table kernel, cuda/linear.cu)
#   m <= CUDA_GEMM_MAX_BATCH      the fused tensor-core GEMM (stream-K kernel to 16, on sm_90a in its
#                                 producer-fed form, or at 9-16 the warp-specialized wgmma kernel where
#                                 it measured faster, as on (14336, 4096) and (4096, 4096):
#                                 cuda/gemm_wgmma_ws.cu;
#                                 above, the Hopper wgmma kernels where gemm_uses_wgmma, else the
#                                 tiled mma.sync one)
#   m <= CUDA_WGMMA_MAX_BATCH     the same GEMM where it runs wgmma (in_features % 256 == 0; past
#                                 batch 64 its warp-specialized kernel, cuda/gemm_wgmma_ws.cu)
#   larger                        dequantize into a temporary, then cuBLAS
# Measured on the H100 (`python -m fp4 bench --kernels`, bf16 nf4, CUDA graphs, weights beyond L2), us
# for GEMV / GEMM (/ dequantize+cuBLAS), batch 1: (2048, 4096) 4.6 / 7.0, (4096, 2048) 5.2 / 6.9,
# (8192, 2048) 6.8 / 8.5, (4096, 4096) 7.4 / 8.5, (2048, 5632) 6.1 / 7.0, (4096, 8192) 10.9 / 13.8,
# (3072, 8192) 10.7 / 10.8, (8192, 4096) 12.1 / 12.5; long rows: (1024, 8192) 6.9 / 7.6, (2048, 8192)
# 10.1 / 8.5, (1024, 14336) 10.5 / 9.0, (2048, 14336) 16.0 / 12.4; past 2^25: (4096, 11008) 14.4 /
# 14.4, (4096, 14336) 17.3 / 16.4, (11008, 4096) 16.9 / 14.2, (14336, 4096) 21.6 / 16.1, (8192, 8192)
# 19.9 / 17.8, (28672, 8192) 64.6 / 56.1 / 408. Batch 2: (2048, 4096) 5.3 / 7.2, (4096, 2048) 5.9 /
# 7.0, (1024, 8192) 8.4 / 7.7, (2048, 5632) 7.5 / 7.1, (2048, 8192) 8.9 / 8.7, (4096, 4096) 9.4 / 8.6,
# (8192, 2048) 10.6 / 8.8, (1024, 14336) 13.6 / 9.3, (3072, 8192) 15.0 / 10.9, (4096, 8192) 16.7 /
# 14.0, (14336, 4096) 30.4 / 17.8. fp16 within 0.5 us of these (the one flip: (2048, 8192) batch 2,
# 8.4 / 8.6). Earlier runs (before the pair-table GEMV and the fed kernel's aligned table):
# (28672, 8192) batch 4: GEMV 150 / GEMM 66.4 / 410, batch 64: - / 121 / 412, batch 256: - / 195-208 /
# 431, batch 512: - / 390-427 / 546-554, batch 1024: - / 702-839 / 847-855; (4096, 14336) batch 256: -
# / 60-63 / 132, batch 512: - / 101-106 / 149, batch 1024: - / 169-185 / 217; (14336, 4096) batch 256:
# - / 54-59 / 125, batch 512: - / 105-112 / 160, batch 1024: - / 210-257 / 225 (a tie that moves with
# the GPU's clocks: the GEMM keeps it, needing no dense temporary). docs/perf-log.md has the history.
CUDA_GEMV_MAX_WEIGHTS = {1: 1 << 25, 2: 1 << 23}
CUDA_GEMV_LONG_ROWS = 4
CUDA_GEMV_LONG_ROWS_MAX_WEIGHTS = {1: 1 << 23, 2: 1 << 22}
CUDA_GEMV_MAX_BATCH = max(CUDA_GEMV_MAX_WEIGHTS)
CUDA_GEMM_MAX_BATCH = 64
CUDA_WGMMA_MAX_BATCH = 1024
GEMV_KERNEL_MAX_BATCH = _C.gemv_max_batch()  # the largest batch one CUDA GEMV launch takes
# Past it the GEMV runs once per GEMV_KERNEL_MAX_BATCH rows (the weight read once per launch); where
# the GEMM cannot run (float32 activations, unaligned shapes), that beats a dense copy up to this
# batch. H100, fp32 nf4, batch 16: dequantize + cuBLAS / GEMV on 8 rows: (2048, 2048) 44.9 / 11.1,
# (4096, 4096) 100.8 / 40.0, (2048, 768) 19.3 / 5.3 us (measured before the GEMV took two rows per
# warp for fp32: 8 rows of (4096, 4096) now 23.5).
GEMV_CHUNKED_MAX_BATCH = 2 * GEMV_KERNEL_MAX_BATCH
KERNELS = ("gemv", "gemm", "dequantize_matmul")

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

    __slots__ = ("codes", "scales", "nested", "quant_type", "blocksize", "out_features", "in_features", "_prepared")

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
        if self.out_features < 0 or self.in_features < 1:
            raise ValueError(f"out_features, in_features: expected >= 0 and >= 1, got {self.out_features} and "
                             f"{self.in_features}")
        self._prepared = None

    @property
    def prepared(self):
        """The weight as a _C.PreparedWeight: its arrays are converted and checked once, so a forward
        call hands libfp4 only x, bias and y (each DLPack conversion costs microseconds of host time)."""
        if self._prepared is None:
            # (capsules: the torch ops prepare a weight on every call, see dlpack_of)
            nested = {name: dlpack_of(value) if isinstance(value, torch.Tensor) else value
                      for name, value in self.nested.items()}
            self._prepared = _C.prepare_weight(dlpack_of(self.codes), dlpack_of(self.scales), self.quant_type,
                                               self.blocksize, self.out_features, self.in_features, **nested)
        return self._prepared

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


def choose_kernel(x: torch.Tensor, args: KernelArgs, m: int) -> str:
    """The dispatch: which kernel computes a batch of m rows (see the table above)."""
    if x.device.type != "cuda":
        return "gemv"  # the CPU kernel serves every batch
    gemm = gemm_supports(x, args)
    if m <= CUDA_GEMV_MAX_BATCH and (not gemm or _gemv_beats_gemm(m, args.out_features, args.in_features)):
        return "gemv"
    if gemm:
        if m <= CUDA_GEMM_MAX_BATCH:
            return "gemm"
        device = x.device.index if x.device.index is not None else torch.cuda.current_device()
        if m <= CUDA_WGMMA_MAX_BATCH and gemm_uses_wgmma(device) and wgmma_supports(args):
            return "gemm"
        return "dequantize_matmul"
    # float32 activations or unaligned shapes: the GEMV still beats a dense copy up to its limit.
    return "gemv" if m <= GEMV_CHUNKED_MAX_BATCH else "dequantize_matmul"


def _gemv_beats_gemm(m: int, out_features: int, in_features: int) -> bool:
    """Where the GEMV serves a batch of m <= CUDA_GEMV_MAX_BATCH rows that the GEMM could (measured:
    the table above)."""
    weights = out_features * in_features
    if in_features >= CUDA_GEMV_LONG_ROWS * out_features:
        return weights <= CUDA_GEMV_LONG_ROWS_MAX_WEIGHTS[m]
    return weights <= CUDA_GEMV_MAX_WEIGHTS[m]


@functools.lru_cache(maxsize=None)
def gemm_uses_wgmma(device_index: int) -> bool:
    """Whether the GEMM runs Hopper warpgroup MMA on this CUDA device for batches > 16 (then it beats
    dequantize + cuBLAS up to CUDA_WGMMA_MAX_BATCH)."""
    return _C.gemm_4bit_uses_wgmma(device_index)


def wgmma_supports(args: KernelArgs) -> bool:
    """The Hopper GEMM's own limits (mirrors gemm_4bit_wgmma_supports in cuda/gemm_wgmma.cu): whole
    256-column stages, blocks of >= 64, nested codes readable as aligned 4-byte words."""
    if args.in_features % 256 or args.blocksize < 64 or args.out_features > 65535 * 128:
        return False
    codes = args.nested.get("nested_codes")
    return codes is None or (codes.data_ptr() % 4 == 0 and codes.numel() % 4 == 0)


def gemm_supports(x: torch.Tensor, args: KernelArgs) -> bool:
    """Whether the tensor-core GEMMs can take x with this weight: fp16/bf16 activations, in_features a
    multiple of 128 and codes aligned to 16 bytes (else the GEMV or dequantize + matmul serve it)."""
    return (x.dtype in (torch.float16, torch.bfloat16) and args.in_features % 128 == 0
            and args.codes.data_ptr() % 16 == 0)


def linear_4bit_prepared(x: torch.Tensor, args: KernelArgs, bias: Optional[torch.Tensor] = None,
                         out: Optional[torch.Tensor] = None, kernel: Optional[str] = None):
    """linear_4bit with the weight's arguments prepared by KernelArgs (what FP4Linear caches).
    `out`, when given, is a contiguous tensor of the result's shape and dtype to write into.
    `kernel` forces one of KERNELS (for benchmarks); by default choose_kernel decides."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS} or None, got {kernel!r}")
    out_features, in_features = args.out_features, args.in_features
    flat = x.dim() == 2  # (then x and y are their own 2-d views: each reshape costs ~0.6 us of host time)
    x2 = x if flat else x.reshape(-1, in_features)
    m = x2.shape[0]
    y = out if out is not None else torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:  # (nothing to compute; the kernels take no empty arrays)
        return y
    if bias is not None and bias.dtype != x.dtype:
        check_float_dtype(bias, "bias")
        bias = bias.to(x.dtype)
    kernel = kernel or choose_kernel(x, args, m)
    y2 = y if flat else y.view(m, out_features)
    if kernel == "dequantize_matmul":
        weight = torch.empty(out_features, in_features, dtype=x.dtype, device=x.device)
        _C.dequantize_4bit(args.codes, args.scales, weight.reshape(-1), args.quant_type, args.blocksize, stream_of(x),
                           **args.nested)
        if bias is None:
            torch.mm(x2, weight.t(), out=y2)
        else:
            torch.addmm(bias, x2, weight.t(), out=y2)
        return y
    x2 = x2.contiguous()
    bias = None if bias is None else bias.contiguous()
    if kernel == "gemm":
        if x2.data_ptr() % 16:
            x2 = x2.clone()
        workspace = torch.empty(_C.gemm_4bit_workspace_size(m, out_features), dtype=torch.uint8, device=x.device)
        _C.gemm_prepared(dlpack_of(x2), args.prepared, _dlpack_or_none(bias), dlpack_of(y2), dlpack_of(workspace),
                         stream_of(x))
    elif m <= GEMV_KERNEL_MAX_BATCH or not x.is_cuda:  # (the CPU kernel takes any batch)
        _C.linear_prepared(dlpack_of(x2), args.prepared, _dlpack_or_none(bias), dlpack_of(y2), stream_of(x))
    else:
        stream = stream_of(x)
        for first in range(0, m, GEMV_KERNEL_MAX_BATCH):  # (a capsule is used up by one call: new ones each)
            rows = slice(first, first + GEMV_KERNEL_MAX_BATCH)
            _C.linear_prepared(dlpack_of(x2[rows]), args.prepared, _dlpack_or_none(bias), dlpack_of(y2[rows]), stream)
    return y


def _dlpack_or_none(tensor: Optional[torch.Tensor]):
    return None if tensor is None else dlpack_of(tensor)


def linear_4bit_grad_input(grad_out: torch.Tensor, args: KernelArgs) -> torch.Tensor:
    """dL/dx = grad_out @ W for y = x @ W.T: the weight is dequantized one slab of rows at a time
    (GRAD_SLAB_ELEMENTS at most) and each slab's product is accumulated, so no dense copy of the
    whole weight is ever held; each product runs on cuBLAS / torch's CPU GEMM."""
    out_features, in_features = args.out_features, args.in_features
    lead = grad_out.shape[:-1]
    if grad_out.numel() == 0:  # (no rows, or no output features: nothing flows back)
        return grad_out.new_zeros(*lead, in_features)
    args.prepared  # (checks the codes and scales against the shape: the slabs below read only parts of them)
    g = grad_out.reshape(-1, out_features)
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
