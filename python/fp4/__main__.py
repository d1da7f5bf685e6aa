"""python -m fp4 <command>: info (the build), check (formats and speed, the main job), bench (one layer vs peers)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fp4", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="version, CUDA build, architectures, CCCL, visible devices")

    check = commands.add_parser("check", help="bit-exactness vs bitsandbytes, then a speed/accuracy table")
    check.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    check.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")

    bench = commands.add_parser("bench", help="time one linear layer: fp4 vs torch and bitsandbytes")
    bench.add_argument("--device", default=None)
    bench.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,28672x8192",
                       help="comma-separated OUTxIN shapes")
    bench.add_argument("--batches", default="1,4,16,64,256,1024")
    bench.add_argument("--dtypes", default="float16")
    bench.add_argument("--formats", default="fp4,nf4")
    bench.add_argument("--repeats", type=int, default=50)
    bench.add_argument("--json", default=None, help="write the results here")
    bench.add_argument("--png", default=None, help="plot speedup over torch vs batch into this PNG (needs matplotlib)")
    bench.add_argument("--plot-only", default=None, metavar="JSON", help="only plot an earlier --json file (--png)")
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
