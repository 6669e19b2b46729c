"""The CNN-Transformer encoder (shapes, conv length arithmetic, padding invariance, frame cap) and
SpecAugment (bounds, valid frames only, determinism)."""
import dataclasses

import pytest
import torch

from trainer.augment import spec_augment
from trainer.model import PRESETS, SEED_CONV, CnnTransformer, EncoderConfig, conv_stack, get_preset, output_lengths

# The seed's conv stack with a small transformer, so each test runs in well under a second.
SMALL = EncoderConfig(width=32, layers=2, heads=2, ff_dim=64, out_dim=24,
                      conv=SEED_CONV[:-1] + ((32, 11, 2),))


def _batch(lengths, dim=39, seed=0):
    """Zero-padded random features [B, max(lengths), dim] and lengths [B]."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.zeros(len(lengths), max(lengths), dim)
    for b, n in enumerate(lengths):
        feats[b, :n] = torch.randn(n, dim, generator=g)
    return feats, torch.tensor(lengths)


@pytest.mark.parametrize("pooling", ["first", "mean", "attention"])
@pytest.mark.parametrize("pos_emb", ["none", "sinusoidal", "learned"])
def test_output_shape_for_every_pooling_and_position(pooling, pos_emb):
    torch.manual_seed(0)
    model = CnnTransformer(dataclasses.replace(SMALL, pooling=pooling, pos_emb=pos_emb)).eval()
    feats, lengths = _batch([250, 37, 1])
    out = model(feats, lengths)
    assert out.shape == (3, 24)
    assert torch.isfinite(out).all()


def test_output_lengths_match_the_conv_stack():
    torch.manual_seed(0)
    model = CnnTransformer(SMALL)
    for n in list(range(1, 80)) + [255, 256, 257, 1000, 2047, 2048]:
        x = torch.randn(1, SMALL.input_dim, n)
        for conv in model.convs:
            x = conv(x)
        assert x.shape[-1] == int(model.output_lengths(torch.tensor([n]))[0]), n
    # total stride 16: long inputs give ceil(n / 16) steps
    assert SMALL.total_stride == 16
    assert output_lengths(torch.tensor([1600, 1601]), SEED_CONV).tolist() == [100, 101]


@pytest.mark.parametrize("pooling", ["mean", "attention"])
@pytest.mark.parametrize("pos_emb", ["none", "learned"])
def test_padding_mask_makes_embedding_independent_of_padding(pooling, pos_emb):
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, pooling=pooling, pos_emb=pos_emb, padding_mask=True)
    model = CnnTransformer(cfg).eval()
    alone_feats, alone_len = _batch([93])
    feats, lengths = _batch([93, 400, 17])
    feats[0] = 0
    feats[0, :93] = alone_feats[0]
    with torch.no_grad():
        alone = model(alone_feats, alone_len)[0]
        padded = model(feats, lengths)[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_without_padding_mask_padding_leaks_in_like_the_seed():
    # The seed's behaviour (no mask): the same utterance in a longer batch embeds differently. This is what
    # the invariance test above guards against.
    torch.manual_seed(0)
    model = CnnTransformer(dataclasses.replace(SMALL, pooling="mean")).eval()
    alone_feats, alone_len = _batch([93])
    feats = torch.zeros(2, 400, 39)
    feats[0, :93] = alone_feats[0]
    with torch.no_grad():
        alone = model(alone_feats, alone_len)[0]
        padded = model(feats, torch.tensor([93, 400]))[0]
    assert (padded - alone).abs().max() > 1e-3


def test_frames_beyond_max_frames_are_cut():
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, max_frames=64, pooling="mean", padding_mask=True)
    model = CnnTransformer(cfg).eval()
    feats, lengths = _batch([150, 40])
    with torch.no_grad():
        full = model(feats, lengths)
        cut = model(feats[:, :64].clone(), torch.tensor([64, 40]))
    torch.testing.assert_close(full, cut)
    assert model.output_lengths(torch.tensor([150])).item() == model.output_lengths(torch.tensor([64])).item()


def test_seed_preset_parameter_count():
    model = CnnTransformer(PRESETS["seed"])
    conv, in_ch = 0, 39
    for out_ch, k, _ in SEED_CONV:
        conv += in_ch * out_ch * k + out_ch
        in_ch = out_ch
    w, ff = 128, 2048
    layer = (3 * w * w + 3 * w) + (w * w + w) + (w * ff + ff) + (ff * w + w) + 4 * w
    head = 2 * w + w * 512 + 512
    expected = conv + 8 * layer + head
    assert expected == 5_486_944
    assert sum(p.numel() for p in model.parameters()) == expected


def test_presets_and_config_round_trip():
    seed = PRESETS["seed"]
    assert (seed.layers, seed.pooling, seed.padding_mask, seed.pos_emb) == (8, "first", False, "none")
    demo = PRESETS["demo"]
    assert (demo.layers, demo.pooling, demo.padding_mask, demo.conv_init) == (2, "mean", True, "kaiming")
    for cfg in (seed, demo, dataclasses.replace(SMALL, pos_emb="sinusoidal")):
        assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    assert get_preset("seed", out_dim=128).out_dim == 128
    with pytest.raises(ValueError, match="unknown encoder preset"):
        get_preset("huge")
    with pytest.raises(ValueError, match="unknown EncoderConfig keys"):
        EncoderConfig.from_dict({**seed.to_dict(), "widht": 3})
    with pytest.raises(ValueError, match="pooling"):
        EncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="conv_init"):
        EncoderConfig(conv_init="xavier")
    with pytest.raises(ValueError, match="width"):
        EncoderConfig(width=256)  # the last conv still has 128 channels


def test_conv_stack_keeps_the_seed_kernels_and_strides():
    assert conv_stack(96, 128) == SEED_CONV
    narrow = conv_stack(48, 128)
    assert [c[0] for c in narrow] == [48] * 6 + [128]
    assert [c[1:] for c in narrow] == [c[1:] for c in SEED_CONV]   # same receptive field and total stride 16
    model = CnnTransformer(dataclasses.replace(SMALL, conv=conv_stack(48, SMALL.width)))
    assert [c.out_channels for c in model.convs] == [48] * 6 + [SMALL.width]
    with pytest.raises(ValueError, match="channels"):
        conv_stack(0, 128)


def test_kaiming_conv_init_keeps_the_signal_through_the_conv_stack():
    # PyTorch's default Conv1d init shrinks the signal at each layer, so the seed's 7 convs output almost
    # only their biases; He-normal keeps its scale (the demo's reason for conv_init="kaiming").
    feats = torch.randn(4, 400, SMALL.input_dim)

    def conv_output_spread(init):
        torch.manual_seed(0)
        model = CnnTransformer(dataclasses.replace(SMALL, conv=conv_stack(96, SMALL.width), conv_init=init))
        x = feats.transpose(1, 2)
        for conv in model.convs:
            x = torch.relu(conv(x))
        return x.std(dim=(0, 2)).mean().item()   # how much the output varies with the input

    he = CnnTransformer(dataclasses.replace(SMALL, conv=conv_stack(96, SMALL.width), conv_init="kaiming"))
    for conv in he.convs:
        assert torch.all(conv.bias == 0)
        fan_in = conv.in_channels * conv.kernel_size[0]
        assert abs(conv.weight.std().item() / (2 / fan_in) ** 0.5 - 1) < 0.1
    assert conv_output_spread("kaiming") > 10 * conv_output_spread("pytorch")


@pytest.mark.parametrize("pooling", ["first", "mean", "attention"])
def test_gradients_reach_every_parameter(pooling):
    torch.manual_seed(0)
    model = CnnTransformer(dataclasses.replace(SMALL, pooling=pooling, pos_emb="learned", padding_mask=True))
    feats, lengths = _batch([120, 64])
    model(feats, lengths).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _ones_batch(lengths, dims=40):
    """Features of ones inside each utterance and 7 in the padding, so masks and padding are visible."""
    feats = torch.full((len(lengths), max(lengths), dims), 7.0)
    for b, n in enumerate(lengths):
        feats[b, :n] = 1.0
    return feats, torch.tensor(lengths)


def test_spec_augment_masks_bands_inside_valid_frames():
    lengths = [300, 50, 200, 10] * 16
    feats, lens = _ones_batch(lengths)
    original = feats.clone()
    out = spec_augment(feats, lens, torch.Generator().manual_seed(0))
    assert torch.equal(feats, original), "the caller's batch was masked in place"
    assert not torch.equal(out, feats)
    for b, n in enumerate(lengths):
        assert (out[b, n:] == 7.0).all(), "a time mask reached the padding"
        valid = out[b, :n]
        assert set(valid.unique().tolist()) <= {0.0, 1.0}
        masked_bins = (valid == 0).all(dim=0)  # a frequency mask zeroes a bin in every frame
        masked_frames = (valid == 0).all(dim=1)
        assert masked_bins.sum() <= 2 * int(0.15 * 40)
        assert masked_frames.sum() <= 2 * int(0.2 * n)
        # every zero is explained by a masked bin or a masked frame
        assert ((valid == 0) == (masked_bins[None, :] | masked_frames[:, None])).all()
    # utterances get their own masks
    assert not torch.equal(out[0, :300] == 0, out[4, :300] == 0)


def test_spec_augment_is_deterministic_given_the_generator():
    feats, lens = _ones_batch([120, 80, 33])
    a = spec_augment(feats, lens, torch.Generator().manual_seed(5))
    b = spec_augment(feats, lens, torch.Generator().manual_seed(5))
    c = spec_augment(feats, lens, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(spec_augment(feats, lens, torch.Generator(), n_masks=(0, 0)), feats)
    with pytest.raises(ValueError, match="n_masks"):
        spec_augment(feats, lens, torch.Generator(), n_masks=(2, 1))
