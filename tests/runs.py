"""The tiny training set-up that the trainer's tests share, on the CPU (test_train.py) and on a GPU
(test_cuda.py)."""
from __future__ import annotations

import json
from pathlib import Path

from trainer.config import TrainConfig, resolve_config

# small and quick: one transformer layer, 8-utterance batches of the 12 training images; fp32 whatever the
# CPU, so that the figures do not depend on the machine (the bf16 path has its own test)
TINY = dict(preset="demo", layers=1, ff_dim=128, lr=2e-3, warmup=5, batch_size=8, log_every=1, threads=1,
            device="cpu", progress=False, eval_every=1000, save_every=1000, cpu_bf16=False)


def tiny_config(cache, out, **changes) -> TrainConfig:
    """The tiny set-up on `cache`, writing to `out`, with `changes`."""
    options = {**TINY, **changes}
    return resolve_config(options.pop("preset"), cache=str(cache), out=str(out), **options)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} of RUN_DIR/metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
