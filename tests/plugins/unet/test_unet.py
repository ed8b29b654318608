"""The `unet` backbone: presets and their parameter counts, reference fidelity against guided-diffusion's
structure with explicit attention, labels and guidance, time broadcasting, discrete tokens and speed options."""

from __future__ import annotations

import pytest
import torch

import registry
from ...reference.backbones import RefUNet, reference_for
from core.interfaces import DataSpec
from plugins.unet.model import PRESETS, UNetConfig

DIGITS = DataSpec(shape=(1, 8, 8), num_classes=10)
CIFAR = DataSpec(shape=(3, 32, 32))
IMAGENET64 = DataSpec(shape=(3, 64, 64), num_classes=1000)
PRESET_DATA = {"cifar10": CIFAR, "imagenet64": IMAGENET64, "digits": DIGITS}

#: Parameter counts of the presets on their data.
#: cifar10: flow_matching's examples/image CIFAR-10 UNet (unconditional, 3x32x32): 55,676,419.
#: imagenet64: guided-diffusion's ImageNet-64 ADM (1000 classes, learn_sigma): 295,905,222, which is
#:   guided-diffusion's 295,904,454 plus the 768 weights of the null-label row (its label table has
#:   no null row).
#: digits: 1,081,569 (1x8x8, 10 classes).
PINNED = {"cifar10": 55_676_419, "imagenet64": 295_905_222, "digits": 1_081_569}


def unet(spec: DataSpec = DIGITS, device: str | None = None, **options):
    with torch.device(device or "cpu"):
        return registry.build("backbone", {"plugin": "unet", **options}, spec=spec)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize(model: torch.nn.Module, gain: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Replace the (partly zero) initial weights by random ones of fan-in scale, so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("out.0") or ".0.weight" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.ndim >= 2 else 400
                p.copy_(torch.randn(p.shape, generator=g) * gain / fan_in ** 0.5)
    return model


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: one thread avoids OpenMP contention on small, busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_counts_are_pinned(preset):
    model = unet(PRESET_DATA[preset], "meta", preset=preset)
    assert count(model) == PINNED[preset]
    cfg, spec = model.config, model.spec
    with torch.device("meta"):
        ref = RefUNet(spec.shape[0], cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.attention_resolutions,
                      cfg.dropout, cfg.num_heads, cfg.num_head_channels, cfg.use_scale_shift_norm, cfg.resblock_updown,
                      cfg.conv_resample, cfg.learn_sigma, spec.num_classes, cfg.norm_groups)
    assert count(ref) == count(model)


def test_preset_values_follow_the_published_configurations():
    fm = UNetConfig(preset="cifar10")
    assert (fm.model_channels, fm.channel_mult, fm.num_res_blocks, fm.attention_resolutions, fm.dropout) == \
        (128, [2, 2, 2], 4, [2], 0.3)
    assert (fm.num_heads, fm.num_head_channels, fm.use_scale_shift_norm, fm.resblock_updown, fm.conv_resample) == \
        (1, -1, True, False, False)
    adm = UNetConfig(preset="imagenet64")
    assert (adm.model_channels, adm.channel_mult, adm.num_res_blocks, adm.attention_resolutions) == \
        (192, [1, 2, 3, 4], 3, [2, 4, 8])
    assert (adm.num_head_channels, adm.use_scale_shift_norm, adm.resblock_updown, adm.learn_sigma, adm.dropout) == \
        (64, True, True, True, 0.1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_every_preset_builds_and_keeps_the_shape(preset, learn_sigma):
    spec = PRESET_DATA[preset]
    model = unet(spec, "meta", preset=preset, learn_sigma=learn_sigma)
    x = torch.empty(2, *spec.shape, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta") if spec.num_classes else None
    out = model(x, torch.empty(2, device="meta"), y)
    c, h, w = spec.shape
    assert out.shape == (2, c * (2 if learn_sigma else 1), h, w)


def test_preset_fills_defaults_that_explicit_keys_override():
    cfg = registry.resolved("backbone", {"plugin": "unet", "preset": "cifar10", "dropout": 0.1, "channel_mult": [1, 2]})
    assert (cfg["model_channels"], cfg["num_res_blocks"], cfg["dropout"], cfg["channel_mult"]) == (128, 4, 0.1, [1, 2])
    assert registry.resolved("backbone", dict(cfg)) == cfg
    plain = UNetConfig()
    assert (plain.model_channels, plain.channel_mult, plain.num_res_blocks) == (128, [1, 2, 2, 2], 2)


def test_configuration_errors_name_the_key():
    with pytest.raises(registry.ConfigError, match="cifar10") as err:
        registry.resolved("backbone", {"plugin": "unet", "preset": "cifar"})
    assert err.value.path == ("preset",)
    with pytest.raises(registry.ConfigError) as err:
        unet(DIGITS, preset="digits", norm_groups=32, model_channels=16)
    assert err.value.path == ("norm_groups",)
    with pytest.raises(registry.ConfigError) as err:
        unet(DataSpec(shape=(1, 6, 6)), preset="digits", channel_mult=[1, 1, 1])
    assert err.value.path == ("channel_mult",)
    with pytest.raises(registry.ConfigError):
        unet(DataSpec(shape=(16,)), preset="digits")


# --------------------------------------------------------------------------- reference fidelity
@pytest.mark.parametrize("options,spec", [
    ({"preset": "digits"}, DIGITS),
    ({"preset": "digits", "resblock_updown": True, "learn_sigma": True, "num_head_channels": -1, "num_heads": 4},
     DataSpec(shape=(3, 16, 16), num_classes=5)),
    ({"preset": "digits", "use_scale_shift_norm": False, "conv_resample": False, "channel_mult": [1, 2, 2],
      "attention_resolutions": [1, 4]}, DataSpec(shape=(2, 8, 8))),
])
def test_unet_equals_the_guided_diffusion_reference(options, spec):
    torch.manual_seed(0)
    model = randomize(unet(spec, **options)).eval()
    ref = reference_for(model).eval()
    x, t = torch.randn(3, *spec.shape), torch.rand(3)
    y = torch.tensor([0, 3, spec.num_classes]) if spec.num_classes else None
    ours, theirs = model(x, t, y), ref(x, t, y)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the comparison sees the attention: another head split changes the output
    ref.middle_block[1].heads = 1 if model.middle_block[1].num_heads > 1 else 2
    assert (ref(x, t, y) - ours).abs().max() > 1e-5


def test_state_dict_uses_guided_diffusion_names():
    keys = set(unet(DIGITS, preset="digits", resblock_updown=True).state_dict())
    for key in ["time_embed.0.weight", "time_embed.2.bias", "label_emb.weight", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                "input_blocks.1.0.out_layers.3.weight", "middle_block.1.qkv.weight", "middle_block.1.proj_out.bias",
                "output_blocks.0.0.skip_connection.weight", "out.2.weight"]:
        assert key in keys


# --------------------------------------------------------------------------- behaviour
def test_output_is_zero_at_init():
    model = unet(DIGITS, preset="digits")
    assert torch.equal(model(torch.randn(2, 1, 8, 8), torch.rand(2)), torch.zeros(2, 1, 8, 8))


def test_null_label_class_dropout_and_eval_determinism():
    torch.manual_seed(0)
    model = randomize(unet(DIGITS, preset="digits", class_dropout_prob=0.5, dropout=0.2))
    x, t, y = torch.randn(64, 1, 8, 8), torch.rand(64), torch.randint(0, 10, (64,))
    model.eval()
    uncond = model(x, t)
    assert torch.equal(uncond, model(x, t, torch.full((64,), 10)))
    cond = model(x, t, y)
    assert torch.equal(cond, model(x, t, y))
    assert (cond - uncond).abs().amax(dim=(1, 2, 3)).min() > 0
    model.train()
    torch.manual_seed(1)
    assert not torch.equal(model(x, t, y), model(x, t, y))  # dropout and label dropout act in training only
    no_dropout = randomize(unet(DIGITS, preset="digits", class_dropout_prob=0.5)).train()
    out = no_dropout(x, t, y)
    no_dropout.eval()
    dropped = torch.isclose(out, no_dropout(x, t), atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, no_dropout(x, t, y), atol=1e-6).flatten(1).all(1)
    assert torch.all(dropped ^ kept) and 10 < dropped.sum() < 54


def test_scalar_time_broadcasts():
    model = randomize(unet(DIGITS, preset="digits", num_res_blocks=1)).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    full = model(x, torch.full((5,), 0.3), y)
    assert torch.equal(model(x, 0.3, y), full)
    assert torch.equal(model(x, torch.tensor(0.3), y), full)
    assert not torch.allclose(model(x, 0.7, y), full)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = unet(DIGITS, preset="digits", resblock_updown=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(16, 1, 8, 8), torch.rand(16), torch.randint(0, 11, (16,))
    target = torch.randn_like(x)
    for _ in range(3):  # from zero-init: the zeroed output convolutions move first, then everything
        opt.zero_grad()
        (model(x, t, y) - target).pow(2).mean().backward()
        opt.step()
    for name, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_checkpointing_and_channels_last_change_nothing():
    torch.manual_seed(0)
    base = randomize(unet(DIGITS, preset="digits", num_res_blocks=1))
    state = base.state_dict()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    base(x, t, y).square().mean().backward()
    for options in ({"use_checkpoint": True}, {"channels_last": True}, {}):
        other = unet(DIGITS, preset="digits", num_res_blocks=1, **options)
        other.load_state_dict(state)
        if not options:  # the trainer's gradient_checkpointing option sets these attributes
            flags = [m for m in other.modules() if hasattr(m, "gradient_checkpointing")]
            assert len(flags) == 8 + 4  # every residual block and every attention block
            for m in flags:
                m.gradient_checkpointing = True
        out = other(x, t, y)
        assert out.is_contiguous()
        torch.testing.assert_close(out, base(x, t, y), rtol=1e-5, atol=1e-5)  # conv algorithms differ
        out.square().mean().backward()
        for (name, pa), pb in zip(base.named_parameters(), other.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_discrete_images_give_logits_over_the_vocabulary():
    spec = DataSpec(shape=(1, 8, 8), kind="discrete", vocab_size=17, num_classes=10)
    model = randomize(unet(spec, preset="digits", num_res_blocks=1))
    assert model.token_embedding.weight.shape == (17, 32)
    x = torch.randint(0, 17, (2, 1, 8, 8))
    logits = model(x, torch.rand(2), torch.tensor([1, 10]))
    assert logits.shape == (2, 1, 8, 8, 17)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 17), x.reshape(-1)).backward()
    assert model.token_embedding.weight.grad.abs().sum() > 0
    rgb = unet(DataSpec(shape=(2, 8, 8), kind="discrete", vocab_size=5), preset="digits", num_res_blocks=1)
    assert rgb(torch.randint(0, 5, (3, 2, 8, 8)), 0.5).shape == (3, 2, 8, 8, 5)
