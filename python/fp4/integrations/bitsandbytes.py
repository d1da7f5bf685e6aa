"""Run unchanged bitsandbytes (and Hugging Face bnb 4-bit) code on fp4's kernels.

    import fp4.integrations.bitsandbytes as fp4_bnb
    fp4_bnb.enable()     # bitsandbytes::quantize_4bit, dequantize_4bit(.out), gemv_4bit(.out),
                         # gemm_4bit now run fp4's CPU and CUDA kernels
    ...                  # bnb.nn.Linear4bit, bnb.functional.*, transformers models: unchanged
    fp4_bnb.disable()    # bitsandbytes' own kernels again

The registrations are ordinary torch.library kernels for the CPU and CUDA dispatch keys, stacked on
top of bitsandbytes' own: disable() removes ours and the dispatcher falls back to theirs. Schemas,
output shapes and dtypes, and argument checks are bitsandbytes'; the values are bit-exact with
bitsandbytes' for quantize/dequantize and equal within fp32-accumulation rounding for the matmuls.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Optional, Sequence

import torch

from .. import functional as F
from .. import ops
from .._torch import VALID_BLOCKSIZES, codebook

_library: Optional[torch.library.Library] = None


def enable() -> None:
    """Registers fp4's kernels for bitsandbytes' 4-bit ops on CPU and CUDA (idempotent)."""
    global _library
    if _library is not None:
        return
    try:
        import bitsandbytes  # noqa: F401  (defines the bitsandbytes:: ops we implement)
    except ImportError as e:
        raise ImportError("fp4.integrations.bitsandbytes.enable() needs bitsandbytes installed") from e
    library = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        # torch warns that we override bitsandbytes' kernels: that is the point, and disable() undoes it.
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for name, kernel in _KERNELS.items():
            for key in ("CPU", "CUDA"):
                _override(library, name, kernel, key)
    _library = library


def disable() -> None:
    """Removes fp4's registrations; bitsandbytes' own kernels serve its ops again."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
        # Our Library's destruction forgot bitsandbytes' own registrations of the same keys (see
        # _override); record them again so torch keeps guarding them.
        torch.library._impls.update(_displaced)
        _displaced.clear()


_displaced: set = set()


def _override(library, name: str, kernel, key: str) -> None:
    """library.impl on a key that bitsandbytes already registered from Python. torch >= 2.12 allows
    it (allow_override); older torch refuses any second Python registration, so the key is
    unrecorded for the moment of ours (the dispatcher itself stacks kernels and restores theirs when
    our Library is destroyed)."""
    try:
        library.impl(name, kernel, key, allow_override=True)
        return
    except TypeError:  # no allow_override parameter in this torch
        pass
    record = f"bitsandbytes/{name}/{key}"
    if record in torch.library._impls:
        torch.library._impls.discard(record)
        _displaced.add(record)
    library.impl(name, kernel, key)


def is_enabled() -> bool:
    """Whether bitsandbytes' 4-bit ops run on fp4's kernels now (enable() was called, disable() not since)."""
    return _library is not None


@contextlib.contextmanager
def enabled():
    """`with enabled(): ...` runs the block on fp4's kernels, then restores the previous state."""
    was = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was:
            disable()


# ---- the kernels, with bitsandbytes' op signatures -------------------------------------------------
def _check_common(blocksize: int, quant_type: Optional[str] = None) -> None:
    torch._check(blocksize in VALID_BLOCKSIZES, lambda: f"invalid blocksize {blocksize}")
    if quant_type is not None:
        torch._check(quant_type in ("nf4", "fp4"), lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _float_dtype(dtype: torch.dtype, what: str) -> None:
    torch._check(dtype in (torch.float16, torch.bfloat16, torch.float32),
                 lambda: f"{what} only supports 16/32-bit floats, but got {dtype}")


def _quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    _check_common(blocksize, quant_type)
    _float_dtype(A.dtype, "Blockwise 4bit quantization")
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    if quant_storage == torch.uint8:
        return packed, state.absmax
    # bitsandbytes sizes the result in quant_storage elements: (n + 1) // (2 * itemsize) of them.
    out = torch.empty(((A.numel() + 1) // (quant_storage.itemsize * 2), 1), dtype=quant_storage, device=A.device)
    flat = out.view(torch.uint8).reshape(-1)
    flat.copy_(packed.reshape(-1)[:flat.numel()])
    return out, state.absmax


def _dequantize_checks(absmax: torch.Tensor, blocksize: int, quant_type: str, dtype: torch.dtype) -> None:
    _check_common(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    _float_dtype(dtype, "Blockwise 4bit dequantization")


def _dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
                     dtype: torch.dtype) -> torch.Tensor:
    _dequantize_checks(absmax, blocksize, quant_type, dtype)
    out = torch.empty(shape, dtype=dtype, device=A.device)
    return F.dequantize_4bit(A, absmax=absmax, out=out, blocksize=blocksize, quant_type=quant_type)


def _dequantize_4bit_out(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int],
                         dtype: torch.dtype, out: torch.Tensor) -> None:
    _dequantize_checks(absmax, blocksize, quant_type, dtype)
    torch._check(out.shape == tuple(shape), lambda: f"Expected out.shape == {shape}, got {out.shape}")
    torch._check(out.device == A.device, lambda: f"Expected out.device == {A.device}, got {out.device}")
    torch._check(out.dtype == dtype, lambda: f"Expected out.dtype == {dtype}, got {out.dtype}")
    F.dequantize_4bit(A, absmax=absmax, out=out, blocksize=blocksize, quant_type=quant_type)


def _gemv_checks(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], blocksize: int) -> None:
    _check_common(blocksize)
    torch._check(A.dtype in (torch.float16, torch.bfloat16, torch.float32),
                 lambda: f"A must be float16, bfloat16, or float32, got {A.dtype}")
    torch._check(B.dtype in (torch.uint8, torch.bfloat16, torch.float16, torch.float32),
                 lambda: f"B must be backed by storage of type uint8, bfloat16, float16, or float32, got {B.dtype}")
    torch._check(len(shapeB) == 2 and A.shape[-1] == shapeB[1],
                 lambda: f"A inner dim ({A.shape[-1]}) must match shapeB {list(shapeB)}")


def _gemv_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor,
               blocksize: int) -> torch.Tensor:
    out = torch.empty(*A.shape[:-1], shapeB[0], dtype=A.dtype, device=A.device)
    _gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out)
    return out


def _gemv_4bit_out(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, out: torch.Tensor) -> None:
    _gemv_checks(A, B, shapeB, blocksize)
    expected = (*A.shape[:-1], shapeB[0])
    torch._check(out.shape == expected, lambda: f"Expected out.shape == {expected}, got {out.shape}")
    torch._check(out.dtype == A.dtype, lambda: f"Expected out.dtype == {A.dtype}, got {out.dtype}")
    quant_type = _quant_type_of(code)
    if quant_type is None:  # a codebook of the caller's own: decode it in torch
        out.copy_(torch.nn.functional.linear(A, _dequantize_with_code(B, absmax, code, blocksize, shapeB, A.dtype)))
        return
    args = ops.KernelArgs(B, absmax, quant_type, blocksize, shapeB)
    target = out if out.is_contiguous() else None
    result = ops.linear_4bit_prepared(A, args, None, out=target)
    if target is None:
        out.copy_(result)


def _gemm_4bit(A: torch.Tensor, B: torch.Tensor, shapeB: Sequence[int], absmax: torch.Tensor, blocksize: int,
               quant_type: str, bias: Optional[torch.Tensor] = None, absmax_8bit: Optional[torch.Tensor] = None,
               absmax_code: Optional[torch.Tensor] = None, absmax_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    _gemv_checks(A, B, shapeB, blocksize)
    _check_common(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    if bias is not None:
        torch._check(bias.ndim == 1 and bias.shape[0] == shapeB[0],
                     lambda: f"bias must be 1D with length N={shapeB[0]}, got {tuple(bias.shape)}")
        torch._check(bias.dtype == A.dtype, lambda: f"bias dtype ({bias.dtype}) must match A dtype ({A.dtype})")
    if absmax_8bit is not None:
        torch._check(absmax_code is not None and absmax_offset is not None,
                     lambda: "absmax_code and absmax_offset are required when absmax_8bit is provided")
        # With nested statistics bitsandbytes passes the float32 scales of the 8-bit codes as absmax.
        args = ops.KernelArgs(B, absmax_8bit, quant_type, blocksize, shapeB, absmax, absmax_code, absmax_offset, 256)
    else:
        args = ops.KernelArgs(B, absmax, quant_type, blocksize, shapeB)
    return ops.linear_4bit_prepared(A, args, bias)


_KERNELS = {
    "quantize_4bit": _quantize_4bit,
    "dequantize_4bit": _dequantize_4bit,
    "dequantize_4bit.out": _dequantize_4bit_out,
    "gemv_4bit": _gemv_4bit,
    "gemv_4bit.out": _gemv_4bit_out,
    "gemm_4bit": _gemm_4bit,
}

# gemv_4bit names its format only by the codebook tensor; bitsandbytes hands the same tensor (the
# QuantState's) on every call, so each is compared with fp4/nf4 once, not once per call.
_known_codes: dict = {}


def _quant_type_of(code: torch.Tensor) -> Optional[str]:
    key = (code.device, code.data_ptr(), code._version, code.numel())
    known = _known_codes.get(key)
    if known is None or known[0]() is not code:  # (a new tensor may reuse a freed one's address)
        if len(_known_codes) > 1024:
            _known_codes.clear()
        found = None
        if code.numel() == 16:
            for name in ("fp4", "nf4"):
                if torch.equal(code.float(), codebook(name, code.device)):
                    found = name
        known = _known_codes[key] = (weakref.ref(code), found)
    return known[1]


def _dequantize_with_code(B, absmax, code, blocksize, shapeB, dtype) -> torch.Tensor:
    packed = B.view(torch.uint8).reshape(-1)
    nibbles = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1).long()
    n = shapeB[0] * shapeB[1]
    values = code.float()[nibbles[:n]] * absmax.float().repeat_interleave(blocksize)[:n]
    return values.reshape(shapeB).to(dtype)
