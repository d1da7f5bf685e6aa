"""The bench plot: speedup over the dense torch layer vs batch, one line per method and shape."""

from __future__ import annotations

import json

METHODS = (("fp4_us", "fp4", "-"), ("bitsandbytes_us", "bitsandbytes", "--"), ("torchao_us", "torchao int4", ":"))


def plot(results, path: str, title: str = "", dtype: str = "") -> None:
    """One line per (method, shape) for one activation dtype (default: bfloat16 when measured, the
    dtype every peer runs, else the first one)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit("--png needs matplotlib: pip install matplotlib") from e
    dtypes = [r["dtype"] for r in results]
    dtype = dtype or ("bfloat16" if "bfloat16" in dtypes else dtypes[0])
    results = [r for r in results if r["dtype"] == dtype]
    shapes = sorted({tuple(r["shape"]) for r in results})
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, shape in enumerate(shapes):
        rows = sorted((r for r in results if tuple(r["shape"]) == shape), key=lambda r: r["batch"])
        for key, name, style in METHODS:
            points = [(r["batch"], r["torch_us"] / r[key]) for r in rows if r.get(key)]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=colors[i % len(colors)], label=f"{name} {shape[0]}x{shape[1]}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows of x)")
    ax.set_ylabel("speedup over torch dense linear (higher is better)")
    ax.set_title(f"{title or '4-bit linear layer vs dense'} [{dtype}]", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_file(json_path: str, png_path: str) -> None:
    with open(json_path) as f:
        data = json.load(f)
    results = data["results"] if isinstance(data, dict) else data
    title = data.get("title", "") if isinstance(data, dict) else ""
    plot(results, png_path, title)
