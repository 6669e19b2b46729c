"""Mixed precision in one place: bf16 autocast on CUDA (no grad scaler needed); on the CPU fp32, or bf16
autocast where asked for and the CPU computes bf16 natively."""
from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX): there the demo preset trains 1.3x faster in
    bf16 than in fp32 (docs/demo-tuning.md); elsewhere bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device | str, cpu_bf16: bool = False):
    """bf16 autocast on CUDA; on the CPU only with cpu_bf16 on a CPU with native bf16, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cpu_bf16 and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda:LOCAL_RANK when a GPU is there, else cpu; an explicit cuda without a GPU is an error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device
