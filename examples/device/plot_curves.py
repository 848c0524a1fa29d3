"""Plot a run's learning curves (train / valid loss and accuracy per epoch) from its metrics.json.

    python examples/device/plot_curves.py --logdir logs/device-experiment --out assets/device_curves.png

Needs matplotlib (``pip install -e .[examples]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", type=Path, default=Path("logs/device-experiment"))
    parser.add_argument("--out", type=Path, default=Path("assets/device_curves.png"))
    args = parser.parse_args()
    metrics_file = args.logdir / "checkpoints" / "metrics.json"
    if not metrics_file.is_file():
        parser.error(f"--logdir: no {metrics_file}; run examples/device/experiment.py first")
    values = json.loads(metrics_file.read_text())["values"]
    epochs = [record["epoch"] for record in values]

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, name in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [r[f"train_{name}"] for r in values], marker="o", markersize=3, label="train")
        axis.plot(epochs, [r[name] for r in values], marker="o", markersize=3, label="valid")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_title(name)
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_yscale("log")
    best = max((r for r in values if r["accuracy"] is not None), key=lambda r: (r["accuracy"], r["epoch"]))
    axes[1].set_ylim(0.8, 1.005)
    axes[1].annotate(
        f"best {best['accuracy']:.4f} @ epoch {best['epoch']}",
        (best["epoch"], best["accuracy"]),
        xytext=(0.35, 0.15),
        textcoords="axes fraction",
        arrowprops={"arrowstyle": "->"},
    )
    figure.suptitle("examples/device: digits, small CNN, CPU")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
