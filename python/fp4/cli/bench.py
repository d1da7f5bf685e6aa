"""`python -m fp4 bench`: one linear layer, fp4 vs its peers, side by side in one run.

Methods: torch dense linear (the weight in the activation dtype), bitsandbytes Linear4bit (same
format), fp4 FP4Linear. GPU time per call is the median over repeats of a CUDA-graph replay that
calls the layer once on each of enough weight copies to overflow the 50 MB L2 (so weights come from
DRAM, as in a real model), divided by the number of calls; CPU time is the median wall time.
'floor' is the 4-bit weight bytes over the measured copy bandwidth; '% floor' = floor / time.
Writes JSON (--json)."""

from __future__ import annotations

import json
import statistics
import time
import warnings

import torch
from torch import nn

import fp4

L2_BYTES = 50 * 2**20
PEAK_COPY_BW = 3.0e12  # bytes/s, measured device-to-device copy on the H100 (KERNELS.md)


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def _bnb_layer(linear, dtype, quant_type, device):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception:
        return None
    return fp4.swap_linear_with_bnb_linear(linear, dtype=dtype, quant_type=quant_type).to(device)


def _gpu_time(layers, x, repeats):
    """Median microseconds per call, over CUDA-graph replays of one call per layer copy."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for layer in layers:  # warm-up outside capture (lazy init, allocator)
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.inference_mode(), torch.cuda.graph(graph):
            for layer in layers:
                layer(x)
        run = graph.replay
    except Exception:  # a peer that cannot be captured is timed eagerly
        def run():
            with torch.inference_mode():
                for layer in layers:
                    layer(x)
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / len(layers))
    return statistics.median(samples)


def _cpu_time(layers, x, repeats):
    with torch.inference_mode():
        layers[0](x)
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            layers[0](x)
            samples.append((time.perf_counter() - t) * 1e6)
    return statistics.median(samples)


def bench_one(out_f, in_f, batch, dtype, quant_type, device, repeats):
    weight_bytes_4bit = out_f * in_f / 2 + out_f * in_f / 64 * 4
    copies = 1 if device.type == "cpu" else max(2, int(2 * L2_BYTES // weight_bytes_4bit) + 1)
    copies = min(copies, 64)
    dense = [nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype) for _ in range(copies)]
    ours = [fp4.FP4Linear.from_linear(d, quant_type=quant_type) for d in dense]
    x = torch.randn(batch, in_f, device=device, dtype=dtype)
    timer = _gpu_time if device.type == "cuda" else _cpu_time
    result = {"shape": [out_f, in_f], "batch": batch, "dtype": str(dtype).replace("torch.", ""),
              "format": quant_type, "device": str(device), "copies": copies}
    result["torch_us"] = timer(dense, x, repeats)
    bnb = [_bnb_layer(d, dtype, quant_type, device) for d in dense]
    result["bitsandbytes_us"] = timer(bnb, x, repeats) if bnb[0] is not None else None
    result["fp4_us"] = timer(ours, x, repeats)
    floor_us = weight_bytes_4bit / PEAK_COPY_BW * 1e6
    result["floor_us"] = floor_us
    result["fp4_pct_floor"] = 100 * floor_us / result["fp4_us"] if device.type == "cuda" else None
    with torch.inference_mode():
        ref = x.double() @ ours[0].dequantize().double().t()
        err = ((ours[0](x).double() - ref).norm() / ref.norm()).item()
    result["fp4_rel_err"] = err
    return result


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    results = []
    header = f"{'shape':>14} {'batch':>5} {'dtype':>8} {'fmt':>4} {'torch':>9} {'bnb':>9} {'fp4':>9} " \
             f"{'vs torch':>8} {'vs bnb':>7} {'%floor':>7}"
    print(f"device: {device}; times in microseconds per call\n{header}")
    for shape in parse_shapes(args.shapes):
        for batch in (int(b) for b in args.batches.split(",")):
            for dtype in dtypes:
                for quant_type in args.formats.split(","):
                    r = bench_one(*shape, batch, dtype, quant_type, device, args.repeats)
                    results.append(r)
                    bnb = r["bitsandbytes_us"]
                    print(f"{'x'.join(map(str, shape)):>14} {batch:>5} {r['dtype']:>8} {quant_type:>4} "
                          f"{r['torch_us']:>9.1f} {bnb if bnb is None else round(bnb, 1)!s:>9} {r['fp4_us']:>9.1f} "
                          f"{r['torch_us'] / r['fp4_us']:>7.2f}x "
                          f"{'-' if bnb is None else format(bnb / r['fp4_us'], '.2f') + 'x':>7} "
                          f"{'-' if r['fp4_pct_floor'] is None else format(r['fp4_pct_floor'], '.0f'):>7}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0
