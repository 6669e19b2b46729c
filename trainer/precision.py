"""Mixed precision in one place: bf16 autocast on CUDA (no grad scaler needed), full fp32 on the CPU."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device | str):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda:LOCAL_RANK when a GPU is there, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device
