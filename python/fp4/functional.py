"""4-bit quantization with bitsandbytes' signatures: swap `bitsandbytes.functional` for
`fp4.functional` and get the same bytes, the same absmax and the same dequantized values."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C
from ._torch import (
    check_blocksize,
    check_float_dtype,
    check_quant_type,
    check_tensor,
    codebook,
    dynamic_code,
    stream_of,
)
from .quant_state import QuantState

NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes nested absmax in blocks of 256

__all__ = ["quantize_4bit", "dequantize_4bit", "quantize_fp4", "quantize_nf4", "dequantize_fp4", "dequantize_nf4",
           "expand_absmax", "get_4bit_type"]


def get_4bit_type(quant_type: str, device="cpu") -> torch.Tensor:
    """The 16 code values of "fp4" or "nf4" as a float32 tensor, as bitsandbytes' get_4bit_type."""
    return codebook(check_quant_type(quant_type), device)


def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> Tuple[torch.Tensor, QuantState]:
    """Quantizes `A` blockwise to 4 bits, bit for bit as `bitsandbytes.functional.quantize_4bit`.

    Args:
        A: float32, float16 or bfloat16 tensor on CPU or CUDA, any shape (finite values).
        absmax, out: optional tensors to copy the absmax / packed result into (bitsandbytes' kwargs).
        blocksize: elements per scale: 32, 64 (default), 128, 256, 512, 1024, 2048 or 4096.
        compress_statistics: also quantize absmax to 8 bits around its mean ("double quant").
        quant_type: "fp4" or "nf4".
        quant_storage: dtype the packed bytes are viewed as (uint8 by default).

    Returns:
        (packed, state): packed codes of shape [ceil(numel / 2), 1], two per byte (high nibble =
        even element), and the QuantState that dequantizes them.
    """
    A = check_tensor(A, "A")
    check_float_dtype(A, "A")
    blocksize = check_blocksize(64 if blocksize is None else blocksize)
    check_quant_type(quant_type)
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(f"quant_storage: expected a torch.dtype, got {type(quant_storage).__name__}")
    if A.device.type == "cuda" and A.numel() and not bool(torch.isfinite(A).all()):
        raise ValueError("A: holds NaN or Inf; 4-bit quantization needs finite values")
    if compress_statistics and A.numel() == 0:
        raise ValueError("A: is empty; compress_statistics needs at least one block")

    flat = A.contiguous().reshape(-1)
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=A.device)
    scales = torch.empty(-(-n // blocksize), dtype=torch.float32, device=A.device)
    _C.quantize_4bit(flat, packed, scales, quant_type, blocksize, stream_of(A))

    code = codebook(quant_type, A.device)
    if compress_statistics:
        offset = scales.mean()  # torch's reduction, exactly as bitsandbytes computes it
        codes, absmax2 = _compress(scales, offset)
        state = QuantState(absmax=codes, shape=A.shape, code=code, dtype=A.dtype, blocksize=blocksize,
                           quant_type=quant_type, offset=offset,
                           state2=QuantState(absmax=absmax2, code=dynamic_code(A.device),
                                             blocksize=NESTED_BLOCKSIZE, dtype=torch.float32))
    else:
        state = QuantState(absmax=scales, shape=A.shape, code=code, dtype=A.dtype, blocksize=blocksize,
                           quant_type=quant_type)

    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def _compress(scales: torch.Tensor, offset: torch.Tensor):
    codes = torch.empty(scales.numel(), dtype=torch.uint8, device=scales.device)
    absmax2 = torch.empty(-(-scales.numel() // NESTED_BLOCKSIZE), dtype=torch.float32, device=scales.device)
    _C.compress_absmax(scales, dynamic_code(scales.device), offset.reshape(1), True, codes, absmax2,
                       NESTED_BLOCKSIZE, stream_of(scales))
    return codes, absmax2


def _nested_args(state: QuantState) -> dict:
    if not state.nested:
        return {}
    return dict(nested_codes=state.absmax, nested_code=state.state2.code.float().contiguous(),
                nested_offset=state.offset.float().reshape(1), nested_blocksize=int(state.state2.blocksize))


def check_code_bytes(codes: torch.Tensor, shape, name: str) -> None:
    """Packed codes for a weight of `shape`, two per byte, counted in bytes: they may be stored as
    another dtype (bitsandbytes' quant_storage)."""
    values = torch.Size(shape).numel()
    got = codes.numel() * codes.element_size()
    if got != (values + 1) // 2:
        raise ValueError(f"{name}: expected {(values + 1) // 2} bytes of codes for a {tuple(shape)} weight, got "
                         f"{got} bytes ({codes.numel()} {codes.dtype} elements)")


def _scales_of(state: QuantState) -> torch.Tensor:
    scales = state.state2.absmax if state.nested else state.absmax
    if not scales.is_floating_point():  # (.float() of integer scales would pass silently)
        raise TypeError(f"quant_state.{'state2.' if state.nested else ''}absmax: expected float32 scales, "
                        f"got {scales.dtype}")
    return scales.float().contiguous()


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Dequantizes packed 4-bit codes, value for value as `bitsandbytes.functional.dequantize_4bit`.

    Args:
        A: the packed codes (uint8, or the quant_storage dtype they were viewed as).
        quant_state: the QuantState from quantize_4bit (fp4's or bitsandbytes'); or give
            `absmax` and `out` (and `blocksize`, `quant_type`) instead.
        out: optional output tensor (its dtype and shape decide the result when no state is given).

    Returns:
        A tensor of the state's dtype and shape.
    """
    A = check_tensor(A, "A")
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("quant_state: give a QuantState, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=out.shape, dtype=out.dtype,
                                 blocksize=64 if blocksize is None else blocksize, quant_type=quant_type)
    elif not isinstance(quant_state, QuantState):
        quant_state = QuantState.from_bnb(quant_state)
    qt = check_quant_type(quant_state.quant_type)
    bs = check_blocksize(quant_state.blocksize)
    if quant_state.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"quant_state.dtype: expected float32, float16 or bfloat16, got {quant_state.dtype}")
    shape = torch.Size(quant_state.shape)
    if out is None:
        out = torch.empty(shape, dtype=quant_state.dtype, device=A.device)
    else:
        check_tensor(out, "out")
        if out.shape != shape or out.dtype != quant_state.dtype:
            raise ValueError(f"out: expected shape {tuple(shape)} and dtype {quant_state.dtype}, "
                             f"got {tuple(out.shape)} and {out.dtype}")
    check_code_bytes(A, shape, "A")
    codes = A.contiguous().view(torch.uint8) if A.dtype != torch.uint8 else A.contiguous()
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    _C.dequantize_4bit(codes.reshape(-1), _scales_of(quant_state), target.reshape(-1), qt, bs, stream_of(target),
                       **_nested_args(quant_state))
    if target is not out:
        out.copy_(target)
    return out


def expand_absmax(quant_state: QuantState) -> torch.Tensor:
    """The float32 scale of every block, nested statistics expanded (bitsandbytes computes this as
    dequantize_blockwise(absmax, state2) + offset)."""
    if not quant_state.nested:
        return quant_state.absmax.float()
    out = torch.empty(quant_state.absmax.numel(), dtype=torch.float32, device=quant_state.absmax.device)
    _C.expand_absmax(_scales_of(quant_state), out, stream_of(out), **_nested_args(quant_state))
    return out


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """quantize_4bit with quant_type="fp4"."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """quantize_4bit with quant_type="nf4"."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """dequantize_4bit with quant_type="fp4"."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """dequantize_4bit with quant_type="nf4"."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")
