"""python -m fp4 <command>: info (the build), check (formats and speed, the main job), bench (one layer vs peers)."""

from __future__ import annotations

import argparse
import sys

from .cli import args as types


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp4", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="version, CUDA build, architectures, CCCL, visible devices")

    check = commands.add_parser("check", help="bit-exactness vs bitsandbytes, then a speed/accuracy table")
    check.add_argument("--device", type=types.device, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    check.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")

    bench = commands.add_parser("bench", help="time one linear layer: fp4 vs torch and bitsandbytes")
    bench.add_argument("--device", type=types.device, default=None, help="cpu or cuda[:N] (default: cuda when available)")
    bench.add_argument("--shapes", type=types.shapes, default="4096x4096,14336x4096,4096x14336,28672x8192",
                       help="comma-separated OUTxIN shapes")
    bench.add_argument("--batches", type=types.positive_ints, default="1,4,16,64,256,1024")
    bench.add_argument("--dtypes", type=types.names_from(types.DTYPES, "activation dtypes"), default="float16",
                       help=f"comma-separated, from {', '.join(types.DTYPES)}")
    bench.add_argument("--formats", type=types.names_from(types.FORMATS, "formats"), default="fp4,nf4",
                       help=f"comma-separated, from {', '.join(types.FORMATS)}")
    bench.add_argument("--repeats", type=types.positive_int, default=50)
    bench.add_argument("--sustain", type=types.positive_seconds, default=None, metavar="SECONDS",
                       help="time each method alone, its calls back to back for this long (the GPU at its power "
                            "limit, as in long inference), over the second half; default: methods in turns")
    bench.add_argument("--json", type=types.output_file, default=None, help="write the results here")
    bench.add_argument("--png", type=types.output_file, default=None,
                       help="plot speedup over torch vs batch into this PNG (needs matplotlib)")
    bench.add_argument("--plot-only", type=types.input_file, default=None, metavar="JSON",
                       help="only plot an earlier --json file (--png)")
    bench.add_argument("--kernels", action="store_true", help="also time each fp4 CUDA kernel forced on its own")
    bench.add_argument("--no-peers", action="store_true", help="skip bitsandbytes and torchao")

    args = parser.parse_args(argv)
    if args.command == "info":
        from .cli.info import run
    elif args.command == "check":
        from .cli.check import run
    elif args.command == "bench":
        from .cli.bench import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
