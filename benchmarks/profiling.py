"""torch.profiler tables for the benchmarks' --profile options."""
from __future__ import annotations

import torch


def profiled(work, device) -> tuple[object, str]:
    """Runs work() under torch.profiler (the CPU, and the GPU when `device` is one): (its result, tables of
    its ops by self CPU time - the host's launch overhead - and, on a GPU, by self device time)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        result = work()
    table = prof.key_averages()
    text = f"by self CPU time\n{table.table(sort_by='self_cpu_time_total', row_limit=30)}"
    if cuda:
        text += f"\n\nby self device time\n{table.table(sort_by='self_device_time_total', row_limit=20)}"
    return result, text
