"""fp4: fast, bit-exact low-bit floating-point weights (bitsandbytes FP4/NF4) for PyTorch, C and C++.

The work is done by libfp4 (a C library with CPU and CUDA kernels); this package is the PyTorch door:

    fp4.functional       quantize_4bit / dequantize_4bit, drop-in for bitsandbytes.functional
    fp4.FP4Linear        the 4-bit linear layer (alias TorchFP4Linear)
    fp4.quantize_        convert a whole model in place: fp4.quantize_(model, fp4.FP4Config("nf4"))
    fp4.QuantState       the quantization state, convertible to and from bitsandbytes' QuantState
    fp4.save / fp4.load  safetensors checkpoints in bitsandbytes' keys (fp4.save_pretrained /
                         fp4.from_pretrained for Hugging Face model folders)
    fp4.library          torch.ops.fp4.* (torch.compile, CUDA graphs, autograd)
    fp4.integrations.bitsandbytes.enable()   run bitsandbytes' own 4-bit ops on fp4's kernels
    fp4.cmake_dir()      where the CMake package lives, for C++ projects: find_package(fp4 CONFIG)

Submodules that need torch are imported on first use, so `python -m fp4 info` works without it.
"""

from __future__ import annotations

import importlib
import os

from . import _C

__version__ = _C.version()

_LAZY = {
    "functional": ("fp4.functional", None),
    "QuantState": ("fp4.quant_state", "QuantState"),
    "nn": ("fp4.nn", None),
    "FP4Linear": ("fp4.nn.linear", "FP4Linear"),
    "TorchFP4Linear": ("fp4.nn.linear", "TorchFP4Linear"),
    "FP4Config": ("fp4.convert", "FP4Config"),
    "quantize_": ("fp4.convert", "quantize_"),
    "from_bnb": ("fp4.convert", "from_bnb"),
    "swap_linear_with_bnb_linear": ("fp4.convert", "swap_linear_with_bnb_linear"),
    "recursively_replace_with_fp4_linear": ("fp4.convert", "recursively_replace_with_fp4_linear"),
    "library": ("fp4.library", None),
    "integrations": ("fp4.integrations", None),
    "save": ("fp4.serialization", "save"),
    "load": ("fp4.serialization", "load"),
    "load_state_dict": ("fp4.serialization", "load_state_dict"),
    "save_pretrained": ("fp4.serialization", "save_pretrained"),
    "from_pretrained": ("fp4.serialization", "from_pretrained"),
    "CheckpointError": ("fp4.checkpoint_format", "CheckpointError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fp4' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


def cmake_dir() -> str:
    """The folder holding fp4Config.cmake: pass it as -Dfp4_DIR=... to a C++ project that does
    `find_package(fp4 CONFIG REQUIRED)` and links `fp4::fp4`."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake", "fp4")


def include_dir() -> str:
    """The folder holding the public C header <fp4/fp4.h>."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")


def cuda_built() -> bool:
    """True when libfp4 was built with its CUDA kernels."""
    return _C.cuda_built()
