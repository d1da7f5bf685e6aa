"""A/B of a libfp4 switch that is read at every launch (FP4_CUDA_STREAM_FED,
FP4_CUDA_STREAM, FP4_CPU_ISA): the same layers timed under each setting in one process, settings
interleaved over several rounds, so a comparison is like for like (same machine, clocks, weights).

    python tools/bench_env_ab.py FP4_CUDA_STREAM_FED=1,0 [--shapes 28672x8192,14336x4096] [--batches 1,4,16]
        [--dtype bfloat16] [--format nf4] [--rounds 3] [--repeats 20]

Prints, per shape and batch, the median us per call of each setting (GPU: CUDA-graph replays over
weight copies beyond the L2, as `python -m fp4 bench`; CPU: wall time) and how much faster it is than
the first (the first's time over its own).
"""
import argparse
import os
import statistics

import torch
from torch import nn

import fp4
from fp4.cli.bench import _cpu_time, _gpu_time, copies_beyond_l2, parse_shapes, weight_bytes_4bit, PEAK_COPY_BW


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", help="NAME=VALUE1,VALUE2[,...] (an empty value unsets it)")
    parser.add_argument("--shapes", default="28672x8192,14336x4096,4096x14336,4096x4096")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--rounds", type=int, default=3, help="times each setting is timed, interleaved")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    name, _, values = args.switch.partition("=")
    settings = values.split(",")
    if not name or len(settings) < 2:
        parser.error("switch: expected NAME=VALUE1,VALUE2")
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats: expected at least 1, got {args.rounds} and {args.repeats}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    timer = _gpu_time if device.type == "cuda" else _cpu_time
    for out_f, in_f in parse_shapes(args.shapes):
        copies = copies_beyond_l2(out_f, in_f, device)
        layers = [fp4.FP4Linear.from_linear(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype),
                                            quant_type=args.format) for _ in range(copies)]
        floor_us = weight_bytes_4bit(out_f, in_f) / PEAK_COPY_BW * 1e6
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, in_f, device=device, dtype=dtype)
            samples = {value: [] for value in settings}
            for _ in range(args.rounds):
                for value in settings:
                    if value:
                        os.environ[name] = value
                    else:
                        os.environ.pop(name, None)
                    samples[value].append(timer(layers, x, args.repeats))
            times = {value: statistics.median(ts) for value, ts in samples.items()}
            first = times[settings[0]]
            cells = "  ".join(f"{name}={value or '(unset)'}: {t:8.2f} us ({first / t:.3f}x)" for value, t in times.items())
            floor = f"  floor {floor_us:.1f} us" if device.type == "cuda" else ""
            print(f"({out_f}, {in_f}) batch {batch:4d}  {cells}{floor}", flush=True)
        del layers
    os.environ.pop(name, None)


if __name__ == "__main__":
    main()
