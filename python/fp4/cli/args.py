"""Argument types for `python -m fp4`: each turns one command-line value into what the command uses,
or stops before any work with a message saying what was expected (argparse prints it against the
option's name). Nothing here imports torch until a device is named."""

from __future__ import annotations

import argparse
import os

DTYPES = ("float16", "bfloat16", "float32")
FORMATS = ("fp4", "nf4")


def _items(text, what):
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return items


def positive_int(text):
    """'16' -> 16; anything below 1, or not an integer, is an error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_seconds(text):
    """'2.5' -> 2.5; zero, negative, or not a number is an error."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def positive_ints(text):
    """'1,4,16' -> [1, 4, 16]."""
    try:
        return [positive_int(item) for item in _items(text, "positive integers")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None


def shapes(text):
    """'4096x4096,14336x4096' -> [(4096, 4096), (14336, 4096)]: (out_features, in_features), each >= 1."""
    parsed = []
    for item in _items(text, "OUTxIN shapes"):
        sizes = item.lower().split("x")
        try:
            pair = tuple(positive_int(size) for size in sizes)
        except argparse.ArgumentTypeError:
            pair = ()
        if len(pair) != 2:
            where = f" in {text!r}" if item != text.strip() else ""
            raise argparse.ArgumentTypeError(f"expected comma-separated OUTxIN shapes of positive sizes "
                                             f"(e.g. 4096x14336), got {item!r}{where}")
        parsed.append(pair)
    return parsed


def names_from(choices, what):
    """A type for comma-separated names, each one of `choices`."""
    def parse(text):
        items = _items(text, what)
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"expected {what} from {', '.join(choices)}, got {', '.join(unknown)}")
        return items
    parse.__name__ = what
    return parse


def device(text):
    """A torch device string that this machine has: 'cpu', 'cuda', 'cuda:1'."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return parsed


def input_file(text):
    """A path to an existing file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return text


def output_file(text):
    """A path whose folder exists and can be written, checked before a long run rather than after."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: no folder {folder!r}")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r}: not writable")
    return text
