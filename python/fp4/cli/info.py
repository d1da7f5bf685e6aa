"""`python -m fp4 info`: what was built and what this machine offers."""

from __future__ import annotations

import fp4
from fp4 import _C


def describe() -> dict:
    info = {
        "fp4": fp4.__version__,
        "libfp4": _C.version(),
        "cuda_built": _C.cuda_built(),
        "cuda_archs": _C.cuda_archs() or "-",
        "nvcc": _C.build_config().get("nvcc") or "-",
        "cccl": _C.build_config().get("cccl") or "-",
        "compiler": _C.build_config().get("cxx", "-"),
        "cuda_devices_libfp4": _C.cuda_device_count(),
        # the Hopper tensor-core GEMM (batch 17-1024) per device: needs sm_90 and a build for 90a
        "wgmma_gemm": ", ".join(f"cuda:{i} {'yes' if _C.gemm_4bit_uses_wgmma(i) else 'no'}"
                                for i in range(_C.cuda_device_count())) or "-",
        "cpu_threads": _C.get_num_threads(),
        "cpu_kernels": _C.cpu_kernels(),
        "cmake_dir": fp4.cmake_dir(),
        "include_dir": fp4.include_dir(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["devices"] = ", ".join(
                f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                for i in range(torch.cuda.device_count()))
        else:
            info["devices"] = "cpu only"
    except ImportError:
        info["torch"] = "not installed"
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # bitsandbytes is optional; any import failure means "not usable"
        info["bitsandbytes"] = "not installed"
    return info


def run(args) -> int:
    for key, value in describe().items():
        print(f"{key:>20}: {value}")
    return 0
