"""`python -m fp4 check`: the main job. Reports the build, proves the formats are bit-exact with
bitsandbytes on this machine's device, then times and compares linear layers (see fp4.cli.speed)."""

from __future__ import annotations

import time

import torch

from .. import functional as F
from .info import describe
from .speed import run_table


def _pick_device(requested):
    return requested or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_formats(device: torch.device, quick: bool) -> bool:
    """Quantizes fresh random tensors with fp4 and bitsandbytes and compares bytes and values."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:
        print("formats: bitsandbytes not installed; checking round-trip error only")
        bnbF = None
    # Even last dimensions: bitsandbytes compiles (torch.compile) a fallback for odd ones, which only
    # slows the check down; the test suite covers odd sizes.
    shapes = [(4096, 4096), (1, 334), (1000, 778)] if not quick else [(1024, 1024), (1, 334)]
    ok = True
    rows = 0
    for quant_type in ("fp4", "nf4"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for nested in (False, True):
                for shape in shapes:
                    A = torch.randn(shape, device=device, dtype=dtype)
                    packed, state = F.quantize_4bit(A, blocksize=64, compress_statistics=nested, quant_type=quant_type)
                    deq = F.dequantize_4bit(packed, state)
                    rel = ((deq.float() - A.float()).norm() / A.float().norm()).item()
                    good = rel < (0.15 if quant_type == "fp4" else 0.12)  # normal data: bnb itself lands near 0.12 and 0.10
                    if bnbF is not None:
                        bp, bs = bnbF.quantize_4bit(A, blocksize=64, compress_statistics=nested, quant_type=quant_type)
                        same_bytes = torch.equal(packed, bp)
                        same_absmax = torch.equal(state.absmax, bs.absmax)
                        same_values = torch.equal(deq, bnbF.dequantize_4bit(bp, bs))
                        good &= same_bytes and same_absmax and same_values
                    rows += 1
                    if not good:
                        ok = False
                        print(f"  MISMATCH {quant_type} {dtype} nested={nested} {shape}: rel.err {rel:.4f}")
    peer = "bit-exact with bitsandbytes" if bnbF is not None else "round trip within bounds"
    print(f"formats: {rows} cases on {device}: {'OK, ' + peer if ok else 'FAILED'}")
    return ok


def run(args) -> int:
    start = time.perf_counter()
    device = _pick_device(args.device)
    info = describe()
    print(f"fp4 {info['fp4']} | CUDA built: {info['cuda_built']} ({info['cuda_archs']}) | torch {info['torch']} | "
          f"bitsandbytes {info['bitsandbytes']} | device: {device}")
    torch.manual_seed(int(time.time()))
    ok = check_formats(device, args.quick)
    ok &= run_table(device, quick=args.quick)
    print(f"check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return 0 if ok else 1
