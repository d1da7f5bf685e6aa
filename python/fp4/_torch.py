"""What the torch-facing modules share: the stream to launch on, dtype names, thread agreement."""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from . import _C

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("fp4", "nf4")

_threads_set = None

# A DLPack capsule of a tensor, for the per-call arguments of the forward kernels. Handed a
# torch.Tensor, nanobind calls Tensor.__dlpack__, a Python method whose checks cost ~2 us per tensor
# (a forward call passes three or four); to_dlpack is the C function behind it (~0.2 us). The
# capsule keeps the tensor alive until libfp4's call has used it.
dlpack_of = to_dlpack


# torch's own fast accessor (what its compiled code uses); the public one costs ~1.5 us per call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(tensor: torch.Tensor) -> int:
    """The raw cudaStream_t of the current stream on the tensor's device (0 on CPU)."""
    if tensor.device.type == "cuda":
        if _raw_stream is not None:
            return _raw_stream(tensor.device.index)
        return torch.cuda.current_stream(tensor.device).cuda_stream
    if tensor.device.type != "cpu":
        raise ValueError(f"expected a CPU or CUDA tensor, got device {tensor.device}")
    _agree_on_threads()
    return 0


def _agree_on_threads() -> None:
    """libfp4's CPU kernels use as many threads as torch does, never more."""
    global _threads_set
    n = torch.get_num_threads()
    if n != _threads_set:
        _C.set_num_threads(n)
        _threads_set = n


def check_tensor(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_dtype(tensor: torch.Tensor, name: str) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float16 or bfloat16, got {tensor.dtype}")


def check_dtype_argument(dtype, name: str) -> torch.dtype:
    """A dtype argument (not a tensor's): float32, float16 or bfloat16."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def check_module(value, name: str) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")
    return value


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {VALID_BLOCKSIZES}, got {blocksize!r}")
    return blocksize


def check_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type: expected 'fp4' or 'nf4', got {quant_type!r}")
    return quant_type


def codebook(quant_type: str, device) -> torch.Tensor:
    """The 16 code values of a format as a float32 tensor (bitsandbytes' `get_4bit_type`)."""
    return _cached_code(("4bit", quant_type), lambda: _C.codebook(quant_type), device)


def dynamic_code(device) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map()`), used for nested absmax."""
    return _cached_code(("dynamic",), _C.dynamic_code, device)


_codes: dict = {}


def _cached_code(key, make, device) -> torch.Tensor:
    device = torch.device(device)
    full_key = key + (str(device),)
    if full_key not in _codes:
        _codes[full_key] = torch.tensor(make(), dtype=torch.float32, device=device)
    # A copy: callers store it in a QuantState that a user may modify in place.
    return _codes[full_key].clone()
