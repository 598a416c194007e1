"""Training curves: metrics.jsonl -> one PNG (loss and validation loss, learning rate, tokens/s, MaxVio)."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path, png_path, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    panels = [("loss", "loss"), ("lr", "learning rate"), ("tokens_per_second", "tokens/s"),
              ("max_violation", "expert load MaxVio")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts:
            ax.plot(*zip(*pts), label="train" if key == "loss" else None, lw=1.2)
        if key == "loss" and val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or str(Path(metrics_path).parent.name))
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
