"""How far apart an audio encoder puts utterances: the mean pairwise cosine of its outputs over the first N
utterances of a cache, and the share of each hidden conv layer's channels that no utterance switches on
(dead ReLUs). A fresh encoder near 1 starts training on a plateau at chance (docs/demo-tuning.md).

    python benchmarks/embedding_spread.py --cache demo/cache                      # the demo preset, initialised
    python benchmarks/embedding_spread.py --cache demo/cache --checkpoint RUN/last.pt RUN2/last.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.reader import StoreReader  # noqa: E402
from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.config import resolve_config  # noqa: E402
from trainer.model import CnnTransformer, EncoderConfig  # noqa: E402
from trainer.train import encoder_config  # noqa: E402


def spread(model: CnnTransformer, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[float, list[float]]:
    """(mean pairwise cosine of the outputs, per hidden conv layer the share of channels never above 0)."""
    outputs = []
    hooks = [conv.register_forward_hook(lambda module, inputs, out: outputs.append(out))
             for conv in model.convs[:-1]]
    try:
        with torch.no_grad():
            emb = F.normalize(model.eval()(feats, lengths), dim=-1)
    finally:
        for hook in hooks:
            hook.remove()
    dead = [float(((out > 0).sum(dim=(0, 2)) == 0).float().mean()) for out in outputs]
    off_diagonal = ~torch.eye(len(emb), dtype=torch.bool)
    return float((emb @ emb.T)[off_diagonal].mean()), dead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, nargs="*", default=[], help="trained encoders to measure too")
    parser.add_argument("--preset", default="demo", help="the initialised encoder's preset [demo]")
    parser.add_argument("--seed", type=int, default=42, help="its initialisation seed [42, train's default]")
    parser.add_argument("--utterances", type=int, default=256)
    args = parser.parse_args()
    with StoreReader(args.cache / "audio") as reader:
        rows = [reader.get(key).astype(np.float32) for key in reader.ids[:args.utterances]]
    lengths = torch.tensor([len(r) for r in rows])
    feats = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        feats[i, :len(r)] = torch.from_numpy(r)
    with StoreReader(args.cache / "images") as images:
        out_dim = images.dims
    torch.manual_seed(args.seed)
    models = {f"{args.preset} preset, initialised": CnnTransformer(encoder_config(
        resolve_config(args.preset, cache=str(args.cache), out="unused"), feats.shape[2], out_dim))}
    for path in args.checkpoint:
        state = load_checkpoint(path)
        model = CnnTransformer(EncoderConfig.from_dict(state["encoder"]))
        model.load_state_dict(state["model"])
        models[str(path)] = model
    for name, model in models.items():
        cosine, dead = spread(model, feats, lengths)
        print(f"{name}: mean pairwise cosine {cosine:.3f} over {len(rows)} utterances; dead ReLU channels per "
              f"hidden conv layer {' '.join(f'{d:.2f}' for d in dead)}")


if __name__ == "__main__":
    main()
