"""`python -m fp4 bench`: one linear layer, fp4 vs its peers, side by side in one run.

Methods: torch dense linear (the weight in the activation dtype), bitsandbytes Linear4bit (same
format), torchao int4 weight-only (group 64, when torchao is installed), fp4 FP4Linear; with
--kernels also each fp4 CUDA kernel forced on its own. Eager time: wall time per call of 50
back-to-back eager calls (host overhead shows where it exceeds the GPU time). GPU time per call is
the median over repeats of a CUDA-graph replay that calls the layer on each of enough weight copies
to overflow the 50 MB L2 in turn (so weights come from DRAM, as in a real model), whole rounds of
them until a replay lasts MIN_REPLAY_US, divided by the number of calls, the methods taking turns
replay by replay (so the GPU's clock and power state favour none); CPU time is the median wall time.
With --sustain SECONDS each method is instead timed alone, its calls back to back for that long, over
the window's second half: held that long the H100 reaches its power limit (700 W) and lowers its
clocks, fp4 from batch 16 (and at batch 1 on the largest weights), cuBLAS from batch 64 (perf log), so
these are the times of long inference rather than of a mixed load.
'floor' is the 4-bit weight bytes over the measured copy bandwidth; '% floor' = floor / time.
Writes JSON (--json)."""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings

import torch
from torch import nn

import fp4
from fp4 import ops

L2_BYTES = 50 * 2**20
PEAK_COPY_BW = 3.0e12  # bytes/s, measured device-to-device copy on the H100 (KERNELS.md)
# A replay starts on an idle GPU: the time from its start event to its first kernel (~5-6 us on the
# H100) is no call's, so a replay makes whole rounds of calls over the copies until it lasts
# MIN_REPLAY_US (the gap then < 1%). With one round (2 calls on the largest weights) it added ~3 us
# per call: (28672, 8192) batch 1 fp4 55.8 -> 52.5 us at 16 calls, (14336, 4096) 22.3 -> 19.3, torch
# 44.3 -> 41.9. More rounds than that only lengthen the sustained load under which the H100's clocks
# fall (perf log).
MIN_REPLAY_US = 600.0
# Replays queued ahead of the one the host waits for under --sustain: the GPU never idles between
# them (each lasts >= MIN_REPLAY_US), and the window ends within a few replays of its length.
SUSTAIN_IN_FLIGHT = 4


def weight_bytes_4bit(out_features, in_features):
    """Bytes of a 4-bit weight with fp32 absmax per 64 values: what a call must read."""
    return out_features * in_features / 2 + out_features * in_features / 64 * 4


def copies_beyond_l2(out_features, in_features, device):
    """How many copies of a layer to call in turn so each call reads its weight from DRAM (twice the
    50 MB L2 in all, at most 64); one on the CPU."""
    if device.type == "cpu":
        return 1
    return min(64, max(2, int(2 * L2_BYTES // weight_bytes_4bit(out_features, in_features)) + 1))


def _bnb_layer(linear, dtype, quant_type, device):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes  # noqa: F401
    except Exception:
        return None
    return fp4.swap_linear_with_bnb_linear(linear, dtype=dtype, quant_type=quant_type).to(device)


def _torchao_layer(linear, device):
    """torchao's int4 weight-only layer (tinygemm, group 64), or None when torchao cannot build one."""
    if device.type != "cuda" or linear.weight.dtype != torch.bfloat16:
        return None  # its int4 kernel takes bf16 activations
    try:
        import copy

        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        model = nn.Sequential(copy.deepcopy(linear))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # tinygemm (torch's _weight_int4pack_mm), the int4 kernel torchao ships without extras
                config = Int4WeightOnlyConfig(group_size=64, int4_packing_format="tile_packed_to_4d")
            except TypeError:
                config = Int4WeightOnlyConfig(group_size=64)
            quantize_(model, config)
        return model
    except Exception:
        return None


class _ForcedKernel(nn.Module):
    """An FP4Linear whose forward always takes one named kernel (to time kernels side by side)."""

    def __init__(self, layer, kernel):
        super().__init__()
        self.args, self.kernel = ops.KernelArgs.of_state(layer.weight, layer.quant_state), kernel

    def forward(self, x):
        return ops.linear_4bit_prepared(x, self.args, None, kernel=self.kernel)


def _eager_time(layers, x, calls=50):
    """Wall microseconds per call of back-to-back eager calls, synchronized at the end."""
    layer = layers[0]
    with torch.inference_mode():
        for _ in range(5):
            layer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            layer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e6 / calls


def calls_per_replay(copies, round_us):
    """Calls one replay makes: whole rounds of the copies (one round taking round_us), enough that
    the replay lasts MIN_REPLAY_US. (A round is timed as at least 1 us: a timer reading near zero
    must not ask for a graph of a million calls.)"""
    return copies * max(1, math.ceil(MIN_REPLAY_US / max(round_us, 1.0)))


def _replay_us(run):
    """GPU microseconds of one run() (after the caller's warm-up)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def _sustained_replay_us(run, seconds):
    """GPU microseconds of one run(), replayed back to back for `seconds` of wall time: the median over
    the replays of the window's second half (by then the clocks have settled at the power limit)."""
    timed = []  # (start, end) events of each replay, in order
    begin = time.perf_counter()
    while time.perf_counter() - begin < seconds:
        if len(timed) >= SUSTAIN_IN_FLIGHT:
            timed[-SUSTAIN_IN_FLIGHT][1].synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        timed.append((start, end))
    timed[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in timed[len(timed) // 2:])


def _graph_runner(layers, x, calls):
    """A callable making `calls` calls, the layer copies in turn: a CUDA-graph replay, or eager
    calls for a layer that cannot be captured."""
    sequence = [layers[i % len(layers)] for i in range(calls)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for layer in layers:  # warm-up outside capture (lazy init, allocator)
            layer(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.inference_mode(), torch.cuda.graph(graph):
            for layer in sequence:
                layer(x)
        return graph.replay
    except Exception:  # a peer that cannot be captured is timed eagerly
        def run():
            with torch.inference_mode():
                for layer in sequence:
                    layer(x)
        return run


def _gpu_times(methods, x, repeats, sustain_s=None):
    """Median GPU microseconds per call of each method (name -> layer copies). The methods take turns,
    one replay each per round, round r starting at method r mod N: under sustained load the H100's
    clocks fall (power), so timing one method after another favoured whichever ran first (up to 9%
    at batch 1024, perf log). With sustain_s, each method alone instead, held for that long
    (_sustained_replay_us)."""
    runs, calls = {}, {}
    for name, layers in methods.items():
        run = _graph_runner(layers, x, len(layers))
        for _ in range(3):  # (warm-up)
            run()
        calls[name] = calls_per_replay(len(layers), _replay_us(run))
        if calls[name] > len(layers):
            run = _graph_runner(layers, x, calls[name])
            for _ in range(3):
                run()
        runs[name] = run
    if sustain_s is not None:
        return {name: _sustained_replay_us(run, sustain_s) / calls[name] for name, run in runs.items()}
    names = list(runs)
    samples = {name: [] for name in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            samples[name].append(_replay_us(runs[name]) / calls[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def _gpu_time(layers, x, repeats):
    """Median microseconds per call, over CUDA-graph replays of one call per layer copy."""
    return _gpu_times({"": layers}, x, repeats)[""]


def _cpu_time(layers, x, repeats, sustain_s=None):
    """Median wall microseconds per call: of `repeats` calls after a short warm-up, or with sustain_s
    of the calls in the second half of that many seconds of calls back to back."""
    with torch.inference_mode():
        # Warm-up: the previous method's threads (torch's OpenMP pool) may still hold the cores.
        warm_until = time.perf_counter() + (0.05 if sustain_s is None else sustain_s / 2)
        while time.perf_counter() < warm_until:
            layers[0](x)
        samples = []

        def time_one_call():
            t = time.perf_counter()
            layers[0](x)
            samples.append((time.perf_counter() - t) * 1e6)

        if sustain_s is None:
            for _ in range(repeats):
                time_one_call()
        else:
            while not samples or time.perf_counter() < warm_until + sustain_s / 2:
                time_one_call()
    return statistics.median(samples)


def bench_one(out_f, in_f, batch, dtype, quant_type, device, repeats, kernels=False, peers=True, sustain_s=None):
    copies = copies_beyond_l2(out_f, in_f, device)
    dense = [nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype) for _ in range(copies)]
    ours = [fp4.FP4Linear.from_linear(d, quant_type=quant_type) for d in dense]
    x = torch.randn(batch, in_f, device=device, dtype=dtype)
    result = {"shape": [out_f, in_f], "batch": batch, "dtype": str(dtype).replace("torch.", ""),
              "format": quant_type, "device": str(device), "copies": copies, "sustain_s": sustain_s}
    methods = {"torch": dense, "fp4": ours}
    args = ops.KernelArgs.of_state(ours[0].weight, ours[0].quant_state)
    bnb = ao = [None]
    if peers:
        bnb = [_bnb_layer(d, dtype, quant_type, device) for d in dense]
        ao = [_torchao_layer(d, device) for d in dense]
        if bnb[0] is not None:
            methods["bitsandbytes"] = bnb
        if ao[0] is not None:
            methods["torchao"] = ao
    if kernels and device.type == "cuda":
        for kernel in ops.KERNELS:
            if kernel == "gemv" and batch > ops.GEMV_CHUNKED_MAX_BATCH:
                continue
            if kernel == "gemm" and not ops.gemm_supports(x, args):
                continue
            methods[f"fp4_{kernel}"] = [_ForcedKernel(layer, kernel) for layer in ours]
    if device.type == "cuda":
        times = _gpu_times(methods, x, repeats, sustain_s)
    else:
        times = {name: _cpu_time(layers, x, repeats, sustain_s) for name, layers in methods.items()}
    result["torch_us"], result["fp4_us"] = times["torch"], times["fp4"]
    result["fp4_kernel"] = ops.choose_kernel(x, args, batch)
    result["bitsandbytes_us"] = times.get("bitsandbytes")
    result["torchao_us"] = times.get("torchao")
    if peers and batch == 1:
        result["eager_us"] = {"torch": _eager_time(dense, x), "fp4": _eager_time(ours, x)}
        if bnb[0] is not None:
            result["eager_us"]["bitsandbytes"] = _eager_time(bnb, x)
    for name, t in times.items():
        if name.startswith("fp4_"):
            result[f"{name}_us"] = t
    floor_us = weight_bytes_4bit(out_f, in_f) / PEAK_COPY_BW * 1e6
    result["floor_us"] = floor_us
    result["fp4_pct_floor"] = 100 * floor_us / result["fp4_us"] if device.type == "cuda" else None
    with torch.inference_mode():
        ref = x.double() @ ours[0].dequantize().double().t()
        err = ((ours[0](x).double() - ref).norm() / ref.norm()).item()
    result["fp4_rel_err"] = err
    return result


def run(args) -> int:
    if args.plot_only:
        from .plot import plot_file

        plot_file(args.plot_only, args.png or args.plot_only.replace(".json", ".png"))
        return 0
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, d) for d in args.dtypes]
    results = []
    header = f"{'shape':>12} {'batch':>5} {'dtype':>8} {'fmt':>4} {'torch':>8} {'bnb':>8} {'torchao':>8} " \
             f"{'fp4':>8} {'kernel':>8} {'vs torch':>8} {'vs bnb':>7} {'%floor':>6}"
    held = "" if args.sustain is None else f", each method held alone for {args.sustain:g} s (its second half timed)"
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"{'GPU' if device.type == 'cuda' else 'wall'} times in microseconds per call{held}\n{header}")

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    for shape in args.shapes:
        for batch in args.batches:
            for dtype in dtypes:
                for quant_type in args.formats:
                    r = bench_one(*shape, batch, dtype, quant_type, device, args.repeats, args.kernels,
                                  not args.no_peers, args.sustain)
                    results.append(r)
                    bnb = r["bitsandbytes_us"]
                    print(f"{'x'.join(map(str, shape)):>12} {batch:>5} {r['dtype']:>8} {quant_type:>4} "
                          f"{fmt(r['torch_us']):>8} {fmt(bnb):>8} {fmt(r['torchao_us']):>8} {fmt(r['fp4_us']):>8} "
                          f"{r['fp4_kernel']:>8} {r['torch_us'] / r['fp4_us']:>7.2f}x "
                          f"{'-' if bnb is None else format(bnb / r['fp4_us'], '.2f') + 'x':>7} "
                          f"{'-' if r['fp4_pct_floor'] is None else format(r['fp4_pct_floor'], '.0f'):>6}"
                          + "".join(f" {k[4:-3]}={v:.1f}" for k, v in r.items()
                                    if k.startswith("fp4_") and k.endswith("_us") and k != "fp4_us")
                          + ("" if "eager_us" not in r else
                             " eager " + " ".join(f"{k}={v:.1f}" for k, v in r["eager_us"].items())), flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    title = (f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}: 4-bit linear vs dense, "
             f"GPU time, weights beyond L2" + ("" if args.sustain is None else f", each held {args.sustain:g} s"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    if args.png:
        from .plot import plot

        plot(results, args.png, title)
    return 0
