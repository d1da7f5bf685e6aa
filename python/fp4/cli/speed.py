"""The speed/accuracy table of `python -m fp4 check` (torch-bnb-fp4's sanity_check, done properly):
a 6-layer MLP (768 -> 2048 x4 -> 64) run as torch nn.Linear, bitsandbytes Linear4bit and fp4's
FP4Linear, for float32/float16/bfloat16, batch 1 (GEMV) and batch 16 (GEMM). Times are per forward
(microseconds: mean, median, IQR); 'diff' is the mean elementwise |output - nn.Linear output|."""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch import nn

import fp4

WIDTHS = [768, 2048, 2048, 2048, 2048, 2048, 64]
BATCHES = {"GEMV": 1, "GEMM": 16}


def _mlp(dtype, device):
    layers = [nn.Linear(a, b) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])]
    return nn.Sequential(*layers).to(device=device, dtype=dtype).eval()


def _bnb_copy(model, dtype, device):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception:
        return None
    bnb_model = copy.deepcopy(model).cpu()
    for i, layer in enumerate(bnb_model):
        bnb_model[i] = fp4.swap_linear_with_bnb_linear(layer, dtype=dtype, quant_type="fp4")
    return bnb_model.to(device)


def _time(fn, x, device, repeats):
    for _ in range(max(3, repeats // 10)):
        fn(x)
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            samples.append((time.perf_counter() - t) * 1e6)
    q = statistics.quantiles(samples, n=4)
    return statistics.mean(samples), statistics.median(samples), q[2] - q[0]


def run_table(device: torch.device, quick: bool = False) -> bool:
    repeats = (20 if quick else 50) if device.type == "cpu" else (100 if quick else 500)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    if device.type == "cpu" and quick:
        dtypes = [torch.float32]
    ok = True
    for dtype in dtypes:
        model = _mlp(dtype, device)
        quantized = fp4.quantize_(copy.deepcopy(model), fp4.FP4Config("fp4"), progress=False)
        bnb_model = _bnb_copy(model, dtype, device)
        for kind, batch in BATCHES.items():
            x = torch.randn(batch, WIDTHS[0], device=device, dtype=dtype)
            rows = [("pytorch", model), ("bitsandbytes", bnb_model), ("fp4", quantized)]
            print(f"\n{str(dtype).replace('torch.', '')} [{kind}, batch {batch}] 6-layer MLP on {device}")
            print(f"  {'type':<14}{'mean (us)':>12}{'median (us)':>13}{'iqr (us)':>11}{'diff':>10}")
            with torch.inference_mode():
                expected = model(x).float()
                for name, net in rows:
                    if net is None:
                        print(f"  {name:<14}{'(not installed)':>46}")
                        continue
                    mean, median, iqr = _time(net, x, device, repeats)
                    diff = (net(x).float() - expected).abs().mean().item()
                    print(f"  {name:<14}{mean:>12.1f}{median:>13.1f}{iqr:>11.1f}{diff:>10.4f}")
                    if name == "fp4" and not torch.isfinite(net(x)).all():
                        ok = False
    return ok
