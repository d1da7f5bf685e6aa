"""A/B of two builds of fp4: a reference tree (a `git archive` tarball, e.g. of HEAD) against the
checkout the device setup built, timed in alternating processes (one process per build and round,
so each build loads its own libfp4), for changes a runtime switch cannot select (kernel code,
register caps, launch shapes). Same timing as `python -m fp4 bench` (CUDA-graph replays over weight
copies beyond the L2; on a machine without a GPU, wall time), seeded layers so both builds multiply
the same weights.

Here (the device has no git):   git archive HEAD -o .device/ref.tar
On the device, after `source .device/setup.sh`:
    python tools/bench_builds_ab.py .device/ref.tar [--shapes 28672x8192,4096x4096] [--batches 1,8,16]
        [--dtype bfloat16] [--format nf4] [--nested] [--rounds 2] [--repeats 20]

The reference is built once into /tmp/fp4_ref (kept while the machine stays warm; ~70-100 s).
Prints each round's medians per build, then the ratio of the medians over the rounds (ref / tree:
> 1 means the checkout is faster). Builds on one machine can differ by ~0.2-0.3 us from layout alone:
trust differences that repeat across rounds and exceed that.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tarfile

from ab_layers import add_layer_arguments, check_layer_arguments

REF_SITE = "/tmp/fp4_ref"


def build_reference(tar_path):
    """Builds the tarball's tree into REF_SITE (with the build tools the device setup installed)."""
    if os.path.exists(os.path.join(REF_SITE, "fp4")):
        return
    source = REF_SITE + "_src"
    os.makedirs(source, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(source, filter="data")
    print(f"building the reference into {REF_SITE} ...", flush=True)
    log_path = REF_SITE + "_build.log"
    with open(log_path, "w") as log:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                               "--target", REF_SITE, "."], cwd=source, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"the reference build failed: see {log_path}")


def time_layers(args):
    """One process's measurements: prints 'batch:us' per batch, one line per shape."""
    import torch

    from ab_layers import device_and_timer, seeded_layers, shapes_and_batches

    device, timer = device_and_timer()
    shapes, batches = shapes_and_batches(args)
    for out_f, in_f in shapes:
        layers = seeded_layers(out_f, in_f, device, args)
        cells = []
        for batch in batches:
            x = torch.randn(batch, in_f, device=device, dtype=getattr(torch, args.dtype))
            cells.append(f"{batch}:{statistics.median(timer(layers, x, args.repeats) for _ in range(3)):.3f}")
        print(f"{out_f}x{in_f} " + " ".join(cells), flush=True)
        del layers


def run_worker(args, label, pythonpath):
    command = [sys.executable, __file__, args.ref, "--worker", "--shapes", args.shapes, "--batches", args.batches,
               "--dtype", args.dtype, "--format", args.format, "--repeats", str(args.repeats)]
    if args.nested:
        command.append("--nested")
    done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=pythonpath), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label}: the timing process failed:\n{done.stderr[-3000:]}")
    times = {}
    for line in done.stdout.splitlines():
        shape, *cells = line.split()
        for cell in cells:
            batch, us = cell.split(":")
            times[(shape, int(batch))] = float(us)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="a tarball of the reference tree (git archive REF -o FILE)")
    add_layer_arguments(parser, batches="1,4,8,16", rounds=2, rounds_help="alternating process pairs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return time_layers(args)
    check_layer_arguments(parser, args)
    if not os.path.isfile(args.ref):
        parser.error(f"ref: no such file: {args.ref} (make it here with git archive HEAD -o {args.ref})")
    build_reference(args.ref)
    tree_path = os.environ.get("PYTHONPATH", "")
    builds = {"ref": REF_SITE + (":" + tree_path if tree_path else ""), "tree": tree_path}
    samples = {label: [] for label in builds}
    for round_ in range(args.rounds):
        for label, pythonpath in builds.items():
            times = run_worker(args, label, pythonpath)
            samples[label].append(times)
            row = "  ".join(f"{shape} b{batch} {us:7.2f}" for (shape, batch), us in times.items())
            print(f"round {round_ + 1} {label:4s}  {row}", flush=True)
    for key in samples["ref"][0]:
        ref = statistics.median(t[key] for t in samples["ref"])
        tree = statistics.median(t[key] for t in samples["tree"])
        print(f"{key[0]:>11s} batch {key[1]:4d}  ref {ref:8.2f} us  tree {tree:8.2f} us  ({ref / tree:.3f}x)")


if __name__ == "__main__":
    main()
