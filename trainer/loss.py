"""The "images as classes" contrastive loss of the seed experiment (utterance i's class is image i of the
batch), with a learnable temperature, in the style of open_clip's ClipLoss."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from trainer.distributed import gather_features, world_info

TARGETS = ("image", "text", "image+text")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `factor`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _global(local: torch.Tensor, world_size: int) -> torch.Tensor:
    """Local rows [B_local, E] -> all ranks' rows [B, E]; see ImagesAsClassesLoss for the gradient scale."""
    if world_size == 1:
        return local
    return gather_features(_ScaleGrad.apply(local, float(world_size)))


class ImagesAsClassesLoss(nn.Module):
    """Cross entropy over the batch: logits = t * cos(audio_i, target_j), class of utterance i = target i.

    targets: "image" (the seed), "text" (the utterance's written-caption embedding) or "image+text" (the
    mean of the two losses, so chance level stays ln B). symmetric: the mean of audio->target and
    target->audio (the seed); otherwise audio->target only. `logit_scale` = log t, initialised at
    log(1 / 0.07); call `clamp_()` after each optimiser step to keep t in [1, 100], as open_clip does.

    Distributed (torch.distributed initialised, equal local batches, global batch = rank 0's rows, then
    rank 1's, ...): every rank gathers all ranks' embeddings, its own slot keeping its gradient, and
    computes the loss of the whole global batch, the value a single process would get. The gradient
    reaching rank r's encoder is then only the part of dL/dtheta that flows through r's own utterances;
    summed over ranks it is the full gradient, so DDP's average would be 1/world_size of it. The local
    embeddings' gradient is therefore multiplied by world_size here, and DDP's average gives exactly the
    single-process gradient. The temperature's gradient is already the full dL/dt on every rank (each rank
    computes the whole loss), identical across ranks, so averaging it changes nothing.
    """

    def __init__(self, targets: str = "image", symmetric: bool = True, init_temperature: float = 0.07,
                 max_scale: float = 100.0):
        super().__init__()
        if targets not in TARGETS:
            raise ValueError(f"targets {targets!r} is not one of {TARGETS}")
        if not 0.0 < init_temperature <= 1.0 or 1.0 / init_temperature > max_scale:
            raise ValueError(f"init_temperature must be in [1/max_scale, 1], got {init_temperature} "
                             f"(max_scale {max_scale})")
        self.targets = targets
        self.symmetric = symmetric
        self.max_logit_scale = math.log(max_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep exp(logit_scale) in [1, max_scale]; call after every optimiser step."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def forward(self, audio: torch.Tensor, image: torch.Tensor,
                text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """audio, image, text [B_local, E] (any float dtype) -> {"loss", "audio_image", "image_audio", ...}.

        Components are the per-direction cross entropies (mean over the global batch), float32.
        """
        if "text" in self.targets and text is None:
            raise ValueError(f"targets={self.targets!r} needs the utterances' caption embeddings (text=...)")
        _, world_size = world_info()
        # fp16/bf16 logits give NaNs or coarse losses (REFERENCE.md section 7): all of it in float32.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            audio = _global(F.normalize(audio.float(), dim=-1), world_size)
            scale = self.logit_scale.float().exp()
            labels = torch.arange(audio.shape[0], device=audio.device)
            parts: dict[str, torch.Tensor] = {}
            per_target = []
            for name, target in (("image", image), ("text", text)):
                if name not in self.targets:
                    continue
                target = _global(F.normalize(target.float(), dim=-1), world_size)
                logits = scale * audio @ target.T  # [B audio, B targets]
                parts[f"audio_{name}"] = F.cross_entropy(logits, labels)
                if self.symmetric:
                    parts[f"{name}_audio"] = F.cross_entropy(logits.T, labels)
                    per_target.append((parts[f"audio_{name}"] + parts[f"{name}_audio"]) / 2)
                else:
                    per_target.append(parts[f"audio_{name}"])
            loss = sum(per_target) / len(per_target)
        return {"loss": loss, **parts}
