"""Two CPU processes (gloo): the gathered loss and the DDP-averaged gradients over 2 ranks x B/2 equal one
process on the full batch B."""
import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from trainer.distributed import gather_features, is_main_process, world_info
from trainer.loss import ImagesAsClassesLoss
from trainer.model import SEED_CONV, CnnTransformer, EncoderConfig, valid_mask
from trainer.sampler import local_slice

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD, BATCH, EMBED = 2, 8, 16
SMALL = EncoderConfig(width=32, layers=2, heads=2, ff_dim=64, dropout=0.0, out_dim=EMBED,
                      conv=SEED_CONV[:-1] + ((32, 11, 2),))
CASES = [  # (encoder fields, loss options)
    ({}, {"targets": "image"}),  # the seed: output at step 0, no padding mask
    ({"pooling": "mean", "padding_mask": True}, {"targets": "image+text"}),
    ({"pooling": "attention", "padding_mask": True, "pos_emb": "learned"},
     {"targets": "text", "symmetric": False}),
]


def _data():
    """The global batch: zero-padded features [B, T, 39], lengths [B], image and caption embeddings [B, E]."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(40, 200, (BATCH,), generator=g)
    feats = torch.randn(BATCH, int(lengths.max()), 39, generator=g)
    feats = feats * valid_mask(lengths, feats.shape[1])[:, :, None]
    return feats, lengths, torch.randn(BATCH, EMBED, generator=g), torch.randn(BATCH, EMBED, generator=g)


def _step(encoder, loss_fn, feats, lengths, image, text):
    """One forward/backward -> (loss, the encoder's gradients by name, the temperature's gradient)."""
    out = loss_fn(encoder(feats, lengths), image, text)
    out["loss"].backward()
    module = encoder.module if isinstance(encoder, DistributedDataParallel) else encoder
    grads = {name: p.grad.clone() for name, p in module.named_parameters()}
    return out["loss"].detach(), grads, loss_fn.logit_scale.grad.clone()


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        assert world_info() == (rank, WORLD) and is_main_process() == (rank == 0)
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_features(x)
        assert gathered[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
        gathered.sum().backward()  # only this rank's own slot carries a gradient back to it
        assert x.grad.tolist() == [[1.0] * 3] * 2

        rows = torch.from_numpy(local_slice(np.arange(BATCH), rank, WORLD))
        results = []
        for fields, options in CASES:
            torch.manual_seed(0)
            encoder = DistributedDataParallel(CnnTransformer(dataclasses.replace(SMALL, **fields)))
            loss_fn = ImagesAsClassesLoss(**options)
            feats, lengths, image, text = (t[rows] for t in _data())
            loss, grads, scale_grad = _step(encoder, loss_fn, feats, lengths, image, text)
            result = {"loss": loss, "grads": grads, "scale_grad": scale_grad}
            if options == {"targets": "image"}:  # open_clip's distributed ClipLoss as a second opinion
                with torch.no_grad():
                    audio = F.normalize(encoder.module(feats, lengths), dim=-1)
                    reference = ClipLoss(rank=rank, world_size=WORLD)(
                        F.normalize(image, dim=-1), audio, loss_fn.logit_scale.exp())
                result["open_clip_loss"] = reference
            results.append(result)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_half_batches_match_one_process_on_the_full_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case, (fields, options) in enumerate(CASES):
        torch.manual_seed(0)
        encoder = CnnTransformer(dataclasses.replace(SMALL, **fields))
        loss, grads, scale_grad = _step(encoder, ImagesAsClassesLoss(**options), *_data())
        for rank in range(WORLD):
            result = ranks[rank][case]
            assert abs(result["loss"].item() - loss.item()) < 1e-5, (case, rank)
            # DDP averaged the encoder's gradients; the temperature's is this rank's own
            torch.testing.assert_close(result["scale_grad"], scale_grad, atol=1e-5, rtol=1e-5)
            for name, grad in grads.items():
                torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-5, msg=name)
            if "open_clip_loss" in result:
                assert abs(result["open_clip_loss"].item() - loss.item()) < 1e-5
