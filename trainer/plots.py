"""The training curves as a PNG: the loss (with its chance level ln B) and the dev metrics against step."""
from __future__ import annotations

import json
import math
from pathlib import Path

from cache.manifest import atomic_target


def read_log(path: str | Path) -> tuple[list[dict], int]:
    """RUN_DIR/metrics.jsonl -> (its records, the number of unreadable lines skipped, e.g. a half-written
    last line of a run that was killed or is still going); ([], 0) when there is no file."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            float(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        records.append(record)
    return records, bad


def plot_curves(log: str | Path, png: str | Path) -> Path | None:
    """Writes `png` from RUN_DIR/metrics.jsonl; None when the log is empty."""
    records, _ = read_log(log)
    if not records:
        return None
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    train = [r for r in records if "loss" in r]
    dev_keys = sorted({k for r in records for k in r if k.startswith("dev/")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if train and all("batch_size" in r for r in train):
        # the loss of a random encoder: a drop below it is learning (steps with a batch schedule)
        ax.plot([r["step"] for r in train], [math.log(r["batch_size"]) for r in train], "--", color="grey",
                label="chance: ln(batch size)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax = axes[1]
    for key in dev_keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="o", label=key[len("dev/"):])
    ax.set_xlabel("step")
    ax.set_ylabel("percent")
    ax.set_title("dev metrics" if dev_keys else "no dev metrics logged")
    ax.grid(alpha=0.3)
    if dev_keys:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    with atomic_target(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png
