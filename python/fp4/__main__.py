"""python -m fp4 <command>: info (the build), check (formats and speed, the main job), bench."""

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

    args = parser.parse_args(argv)
    if args.command == "info":
        from .cli.info import run
    elif args.command == "check":
        from .cli.check import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
