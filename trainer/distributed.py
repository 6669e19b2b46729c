"""Small torch.distributed helpers: who am I, and gathering embeddings across ranks for the loss."""
from __future__ import annotations

import torch
from torch import distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world_info()[0] == 0


def gather_features(local: torch.Tensor) -> torch.Tensor:
    """Local [B_local, E] -> global [world_size * B_local, E], rank r's rows at r * B_local.

    Like open_clip's gather_features (gather_with_grad=False, local_loss=False): the other ranks' rows are
    constants, this rank's slot is `local` itself so gradients reach it. Every rank must pass the same
    shape. Identity when not distributed.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local.detach().contiguous())
    gathered[rank] = local
    return torch.cat(gathered, dim=0)
