"""SpecAugment on a padded batch of feature frames, vectorised over the batch (REFERENCE.md section 1:
1-2 masks, at most 15% of the bins and 20% of the frames, filled with 0)."""
from __future__ import annotations

import torch


def _band_masks(u: torch.Tensor, n_masks: tuple[int, int], max_width: torch.Tensor,
                size: torch.Tensor, axis_len: int) -> torch.Tensor:
    """Uniforms u [3, B, K] -> bool [B, axis_len], True inside the drawn bands.

    Row b gets n ~ U{n_masks[0]..n_masks[1]} bands, each of width ~ U{0..max_width[b]} starting at
    ~ U{0..size[b] - width}, so every band lies inside the first size[b] positions.
    """
    lo, hi = n_masks
    slots = u.shape[-1]
    count = (lo + (u[0, :, 0] * (hi - lo + 1)).floor().long()).clamp(max=hi)  # [B]
    active = torch.arange(slots, device=u.device)[None, :] < count[:, None]  # [B, K]
    width = (u[1] * (max_width[:, None] + 1)).floor().long().clamp(max=max_width[:, None])
    start = (u[2] * (size[:, None] - width + 1)).floor().long().clamp(max=size[:, None] - width)
    pos = torch.arange(axis_len, device=u.device)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None]) & active[..., None]
    return inside.any(dim=1)


def spec_augment(feats: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator,
                 n_masks: tuple[int, int] = (1, 2), max_freq: float = 0.15,
                 max_time: float = 0.2) -> torch.Tensor:
    """feats [B, T, D] (zero-padded), lengths [B] frames -> a masked copy [B, T, D], same dtype and device.

    Each utterance gets its own frequency masks (each at most floor(max_freq * D) bins wide) and time
    masks (each at most floor(max_time * length) frames wide), n_masks[0] to n_masks[1] of each kind, all
    inside its valid frames (padding is untouched). Masked values are 0, the mean of mean/variance-
    normalised features. The draws come from `generator` (on any device): reproducible given its state.
    """
    lo, hi = n_masks
    if not 0 <= lo <= hi:
        raise ValueError(f"n_masks must be (min, max) with 0 <= min <= max, got {n_masks}")
    if not (0.0 <= max_freq <= 1.0 and 0.0 <= max_time <= 1.0):
        raise ValueError(f"max_freq and max_time are fractions in [0, 1], got {max_freq} and {max_time}")
    batch, frames, dims = feats.shape
    if hi == 0 or batch == 0:
        return feats.clone()
    u = torch.rand((2, 3, batch, hi), generator=generator, device=generator.device).to(feats.device)
    valid = lengths.to(feats.device).long().clamp(min=0, max=frames)
    full = torch.full((batch,), dims, device=feats.device, dtype=torch.long)
    freq = _band_masks(u[0], n_masks, (full * max_freq).floor().long(), full, dims)  # [B, D]
    time = _band_masks(u[1], n_masks, (valid * max_time).floor().long(), valid, frames)  # [B, T]
    inside = torch.arange(frames, device=feats.device)[None, :] < valid[:, None]  # [B, T]
    # frequency masks stop at the utterance's end too: the padding is left exactly as it was
    return feats.masked_fill((freq[:, None, :] & inside[:, :, None]) | time[:, :, None], 0.0)
