"""16 images of a cluttered task's val split with their garment's box and class: the picture in docs/datasets.md.

python experiments/cluttered_task/samples.py --dataset cluttered-fashion-mnist --out docs/cluttered.png
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from apt_env.data.datasets import build_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cluttered-fashion-mnist")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", default="cluttered.png")
    args = parser.parse_args()
    ds = build_dataset(args.dataset, split=args.split)
    fig, axes = plt.subplots(4, 4, figsize=(8, 8.6))
    for index, ax in enumerate(axes.flat):
        image, (x0, y0, x1, y1) = ds.render(index)
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="tab:orange", lw=1.2))
        ax.set_title(ds.classes[int(ds.targets[index])], fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{args.dataset}, {args.split} images 0-15 (the garment's box in orange)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
