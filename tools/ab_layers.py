"""What the A/B tools (bench_env_ab.py, bench_builds_ab.py) share: their layer options, the layers
they time (seeded: every process and build multiplies the same weights) and the timer (GPU:
CUDA-graph replays over weight copies beyond the L2, as `python -m fp4 bench`; CPU: wall time)."""
import argparse

import torch
from torch import nn

import fp4
from fp4.cli.args import positive_ints, shapes
from fp4.cli.bench import _cpu_time, _gpu_time, copies_beyond_l2


def add_layer_arguments(parser, batches, rounds, rounds_help):
    parser.add_argument("--shapes", default="28672x8192,14336x4096,4096x14336,4096x4096")
    parser.add_argument("--batches", default=batches)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--format", default="nf4")
    parser.add_argument("--nested", action="store_true", help="double-quantized absmax (bitsandbytes' default)")
    parser.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    parser.add_argument("--repeats", type=int, default=20)


def check_layer_arguments(parser, args):
    if args.rounds < 1 or args.repeats < 1:
        parser.error(f"--rounds and --repeats: expected at least 1, got {args.rounds} and {args.repeats}")
    try:
        shapes_and_batches(args)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--shapes / --batches: {error}")


def device_and_timer():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, (_gpu_time if device.type == "cuda" else _cpu_time)


def shapes_and_batches(args):
    return shapes(args.shapes), positive_ints(args.batches)


def seeded_layers(out_features, in_features, device, args):
    """Enough copies of one layer to overflow the L2, the same weights in every process."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    return [fp4.FP4Linear.from_linear(nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype),
                                      quant_type=args.format, double_quant=args.nested)
            for _ in range(copies_beyond_l2(out_features, in_features, device))]
