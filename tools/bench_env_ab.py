"""A/B of a libfp4 switch that is read at every launch (FP4_CUDA_STREAM_FED,
FP4_CUDA_STREAM, FP4_CPU_ISA): the same layers timed under each setting in one process, settings
interleaved over several rounds, so a comparison is like for like (same machine, clocks, weights).

    python tools/bench_env_ab.py FP4_CUDA_STREAM_FED=1,0 [--shapes 28672x8192,14336x4096] [--batches 1,4,16]
        [--dtype bfloat16] [--format nf4] [--nested] [--rounds 3] [--repeats 20]

Prints, per shape and batch, the median us per call of each setting (GPU: CUDA-graph replays over
weight copies beyond the L2, as `python -m fp4 bench`; CPU: wall time) and how much faster it is than
the first (the first's time over its own).
"""
import argparse
import os
import statistics

import torch

from ab_layers import add_layer_arguments, check_layer_arguments, device_and_timer, seeded_layers, shapes_and_batches
from fp4.cli.bench import weight_bytes_4bit, PEAK_COPY_BW


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", help="NAME=VALUE1,VALUE2[,...] (an empty value unsets it)")
    add_layer_arguments(parser, batches="1,4,16", rounds=3, rounds_help="times each setting is timed, interleaved")
    args = parser.parse_args()
    name, _, values = args.switch.partition("=")
    settings = values.split(",")
    if not name or len(settings) < 2:
        parser.error("switch: expected NAME=VALUE1,VALUE2")
    check_layer_arguments(parser, args)
    device, timer = device_and_timer()
    shapes, batches = shapes_and_batches(args)
    for out_f, in_f in shapes:
        layers = seeded_layers(out_f, in_f, device, args)
        floor_us = weight_bytes_4bit(out_f, in_f) / PEAK_COPY_BW * 1e6
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=getattr(torch, args.dtype))
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
