"""The seed experiment's CNN-Transformer speech encoder (MFCC frames -> one CLIP-sized vector) and its
configuration, a dataclass saved in every checkpoint."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

POS_EMBS = ("none", "sinusoidal", "learned")
POOLINGS = ("first", "mean", "attention")
CONV_INITS = ("pytorch", "kaiming")

# (out_channels, kernel, stride) of each Conv1d, REFERENCE.md section 1; total stride 16.
SEED_CONV = ((96, 9, 2), (96, 11, 1), (96, 11, 2), (96, 11, 1), (96, 11, 2), (96, 11, 1), (128, 11, 2))


def conv_stack(channels: int = 96, width: int = 128) -> tuple[tuple[int, int, int], ...]:
    """The seed's conv layers (kernels, strides) with `channels` in the hidden layers and `width` out of the
    last; conv_stack(96, 128) is SEED_CONV. Narrower channels cut the front-end's FLOPs, which dominate the
    encoder's on short utterances, by about (channels / 96) ** 2."""
    if channels < 1 or width < 1:
        raise ValueError(f"conv channels and width must be >= 1, got {channels} and {width}")
    hidden = tuple((channels, kernel, stride) for _, kernel, stride in SEED_CONV[:-1])
    _, kernel, stride = SEED_CONV[-1]
    return hidden + ((width, kernel, stride),)


@dataclass(frozen=True)
class EncoderConfig:
    """Dimensions and switches of `CnnTransformer`; the defaults are the seed's encoder.

    `conv` lists (out_channels, kernel, stride) per Conv1d, padding kernel // 2, ReLU between layers
    (none after the last); the last out_channels must equal `width`. `ff_dim` 2048 and `dropout` 0.1 are
    PyTorch's TransformerEncoderLayer defaults, which the seed used. `out_dim` is the CLIP embedding size:
    take it from the cache (512 for ViT-B).
    """

    input_dim: int = 39
    conv: tuple[tuple[int, int, int], ...] = SEED_CONV
    width: int = 128
    layers: int = 8
    heads: int = 4
    ff_dim: int = 2048
    dropout: float = 0.1
    pos_emb: str = "none"
    pooling: str = "first"
    padding_mask: bool = False
    max_frames: int = 2048
    out_dim: int = 512
    conv_init: str = "pytorch"

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable and equal to the one that was saved.
        try:
            conv = tuple(tuple(int(v) for v in layer) for layer in self.conv)
        except (TypeError, ValueError):
            raise ValueError(f"conv must be a list of (out_channels, kernel, stride) triples, "
                             f"got {self.conv!r}")
        object.__setattr__(self, "conv", conv)
        if not conv or any(len(layer) != 3 or min(layer) < 1 for layer in conv):
            raise ValueError(f"conv must be a non-empty list of positive (out_channels, kernel, stride) "
                             f"triples, got {self.conv!r}")
        if conv[-1][0] != self.width:
            raise ValueError(f"the last conv layer has {conv[-1][0]} channels but width is {self.width}: "
                             f"they must match (the conv output is the transformer's input)")
        for name in ("input_dim", "width", "heads", "ff_dim", "max_frames", "out_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_emb not in POS_EMBS:
            raise ValueError(f"pos_emb {self.pos_emb!r} is not one of {POS_EMBS}")
        if self.pos_emb == "sinusoidal" and self.width % 2:
            raise ValueError(f"sinusoidal positions need an even width, got {self.width}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"conv_init {self.conv_init!r} is not one of {CONV_INITS}")

    @property
    def total_stride(self) -> int:
        return math.prod(stride for _, _, stride in self.conv)

    @property
    def max_steps(self) -> int:
        """Transformer steps of a `max_frames`-frame input (the length of a learned position table)."""
        return int(output_lengths(torch.tensor([self.max_frames]), self.conv)[0])

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["conv"] = [list(layer) for layer in self.conv]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


PRESETS = {
    "seed": EncoderConfig(),
    # REFERENCE.md section 8: on the 2-core demo, mean pooling over unpadded frames learned best. ff_dim 512
    # (4 x width, the usual transformer ratio; 2048 was only PyTorch's default) quarters the feed-forward
    # weights and FLOPs. 2 layers instead of 4: a 1.3x faster run and a better test R@10 (80 against 73);
    # He-normal conv init: 80 against 67 with PyTorch's default (docs/demo-tuning.md). out_dim 128 is the
    # demo teacher's embed_dim; the trainer still takes out_dim from the cache.
    "demo": EncoderConfig(layers=2, ff_dim=512, pooling="mean", padding_mask=True, out_dim=128,
                          conv_init="kaiming"),
}


def _kaiming_init(convs: nn.ModuleList) -> None:
    """He-normal kernels and zero biases: PyTorch's default init shrinks the signal's second moment about 6x
    per Conv1d + ReLU, so after 7 layers the output is mostly the (input-independent) biases and learning
    starts slowly until the weights have grown; this init keeps the signal's scale."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)


def get_preset(name: str, **overrides) -> EncoderConfig:
    """The preset `name` with some fields replaced, e.g. get_preset("seed", out_dim=cache_dim)."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def output_lengths(lengths: torch.Tensor, conv: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    """Frames [B] long -> steps after the conv stack [B] long.

    Per layer: floor((L + 2 * (kernel // 2) - kernel) / stride) + 1, PyTorch's Conv1d arithmetic.
    """
    for _, kernel, stride in conv:
        lengths = torch.div(lengths + 2 * (kernel // 2) - kernel, stride, rounding_mode="floor") + 1
    return lengths


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """Lengths [B] -> bool [B, size], True at the steps 0..length-1 of each row."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def sinusoidal_positions(steps: int, width: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need": [steps, width] float32."""
    position = torch.arange(steps, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(steps, width)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


class CnnTransformer(nn.Module):
    """Conv1d stack (total stride 16) -> Transformer -> pooling -> LayerNorm -> Linear(width, out_dim).

    With `padding_mask=True` the frames beyond each utterance's length are zeroed before every conv layer
    (so padding cannot leak in through the receptive field) and masked in attention: an utterance's output
    then does not depend on how much it was padded. With `padding_mask=False` (the seed) the transformer
    attends to padded steps; "mean" and "attention" pooling still read valid steps only.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        convs, in_channels = [], cfg.input_dim
        for out_channels, kernel, stride in cfg.conv:
            convs.append(nn.Conv1d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2))
            in_channels = out_channels
        self.convs = nn.ModuleList(convs)
        if cfg.conv_init == "kaiming":
            _kaiming_init(self.convs)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.ff_dim, cfg.dropout, batch_first=True)
        # No nested tensors: eval mode then computes padded steps like training does (and ignores them).
        self.transformer = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        if cfg.pos_emb == "learned":
            self.pos = nn.Parameter(torch.randn(cfg.max_steps, cfg.width) * 0.02)
        elif cfg.pos_emb == "sinusoidal":
            self.register_buffer("pos", sinusoidal_positions(cfg.max_steps, cfg.width), persistent=False)
        else:
            self.pos = None
        if cfg.pooling == "attention":
            self.query = nn.Parameter(torch.randn(cfg.width) * 0.02)
            self.pool_attention = nn.MultiheadAttention(cfg.width, cfg.heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.out_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Input frames [B] long -> transformer steps [B] long (after the max_frames cut)."""
        return output_lengths(lengths.clamp(max=self.cfg.max_frames), self.cfg.conv)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats [B, T, input_dim] float (zero-padded), lengths [B] long in 1..T -> [B, out_dim].

        The output is not normalised (the loss normalises it).
        """
        cfg = self.cfg
        feats = feats[:, : cfg.max_frames]
        lengths = lengths.clamp(max=cfg.max_frames)
        x = feats.transpose(1, 2)  # [B, D, T]: Conv1d wants channels first
        if cfg.padding_mask:
            x = x * valid_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
            lengths = output_lengths(lengths, (cfg.conv[i],))
            if cfg.padding_mask:
                x = x * valid_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
        x = x.transpose(1, 2)  # [B, S, width]
        if self.pos is not None:
            x = x + self.pos[: x.shape[1]].to(x.dtype)
        valid = valid_mask(lengths, x.shape[1])
        x = self.transformer(x, src_key_padding_mask=~valid if cfg.padding_mask else None)
        return self.proj(self.norm(self._pool(x, valid, lengths)))

    def _pool(self, x: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Steps [B, S, width] -> [B, width]."""
        if self.cfg.pooling == "first":
            return x[:, 0]
        if self.cfg.pooling == "mean":
            summed = (x * valid[:, :, None].to(x.dtype)).sum(dim=1)
            return summed / lengths[:, None].to(x.dtype)
        query = self.query.to(x.dtype).expand(x.shape[0], 1, -1)
        pooled, _ = self.pool_attention(query, x, x, key_padding_mask=~valid, need_weights=False)
        return pooled[:, 0]
