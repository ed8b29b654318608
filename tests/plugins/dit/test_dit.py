"""The `dit` backbone: DiT paper presets and parameter counts, adaLN-Zero, labels and guidance,
time broadcasting, discrete tokens (images and 1D sequences), and reference fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import registry
from ...reference.backbones import RefDiT, _pos_embed_2d, reference_for
from core.interfaces import DataSpec
from plugins.dit.model import ARCHS, PRESETS, DiTConfig, sincos_2d

LATENT = DataSpec(shape=(4, 32, 32), num_classes=1000)
DIGITS = DataSpec(shape=(1, 8, 8), num_classes=10)

#: ``sum(p.numel() for p in model.parameters())`` of facebookresearch/DiT's models (32x32x4 latents,
#: 1000 classes, learn_sigma=True, class_dropout_prob > 0 so the table has the null row), the fixed
#: position embedding included as DiT's train.py counts it. The paper's Table 1 gives 33M, 130M,
#: 458M and 675M for /2: the trainable parameters (without the fixed position embedding), rounded.
PAPER_PARAMS = {
    "DiT-S/2": 32_963_360, "DiT-S/4": 32_945_024, "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416, "DiT-B/4": 130_475_648, "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816, "DiT-L/4": 458_053_760, "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632, "DiT-XL/4": 675_074_432, "DiT-XL/8": 675_683_072,
}
PAPER_ROUNDED_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


def dit(spec: DataSpec = DIGITS, device: str | None = None, **options):
    with torch.device(device or "cpu"):
        return registry.build("backbone", {"plugin": "dit", **options}, spec=spec)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_count(size: str, patch: int, channels: int = 4, input_size: int = 32, classes: int = 1000) -> int:
    """The parameter count of DiT's models.py, layer by layer (learn_sigma, null class row)."""
    d, depth = ARCHS[size]["hidden_size"], ARCHS[size]["depth"]
    tokens = (input_size // patch) ** 2
    out = 2 * channels * patch * patch
    x_embedder = channels * patch * patch * d + d
    t_embedder = 256 * d + d + d * d + d
    y_embedder = (classes + 1) * d
    pos_embed = tokens * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (d * out + out)
    return x_embedder + t_embedder + y_embedder + pos_embed + depth * block + final


def randomize(model: torch.nn.Module, gain: float = 1.0, seed: int = 0) -> torch.nn.Module:
    """Replace the (partly zero) initial weights by random ones of fan-in scale, so every layer matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
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
@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
def test_paper_presets_have_the_reference_parameter_counts(preset):
    model = dit(LATENT, "meta", preset=preset, learn_sigma=True)
    size, patch = preset[4:].split("/")
    assert count(model) == PAPER_PARAMS[preset] == reference_count(size, int(patch))
    if patch == "2":
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert round(trainable / 1e6) == PAPER_ROUNDED_M[size]
        assert abs(count(model) / 1e6 - PAPER_ROUNDED_M[size]) < 1
    # the plain reference definition (explicit attention) has the same parameters
    with torch.device("meta"):
        cfg = model.config
        ref = RefDiT(32, cfg.patch_size, 4, cfg.hidden_size, cfg.depth, cfg.num_heads, num_classes=1000, learn_sigma=True)
    assert count(ref) == count(model)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_every_preset_builds_and_keeps_the_shape(preset, learn_sigma):
    spec = DIGITS if preset == "DiT-digits" else LATENT
    model = dit(spec, "meta", preset=preset, learn_sigma=learn_sigma)
    x = torch.empty(2, *spec.shape, device="meta")
    out = model(x, torch.empty(2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    c, h, w = spec.shape
    assert out.shape == (2, c * (2 if learn_sigma else 1), h, w)


def test_preset_fills_defaults_that_explicit_keys_override():
    cfg = registry.resolved("backbone", {"plugin": "dit", "preset": "DiT-B/4", "depth": 3})
    assert (cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"], cfg["depth"]) == (768, 12, 4, 3)
    # the resolved mapping builds the same configuration again
    again = dict(cfg)
    assert registry.resolved("backbone", again) == cfg
    assert DiTConfig().hidden_size == 384 and DiTConfig().class_dropout_prob == 0.0


def test_unknown_preset_and_bad_sizes_are_config_errors():
    with pytest.raises(registry.ConfigError, match="DiT-XL/2") as err:
        registry.resolved("backbone", {"plugin": "dit", "preset": "DiT-XL/3"})
    assert err.value.path == ("preset",)
    with pytest.raises(registry.ConfigError, match="heads"):
        registry.resolved("backbone", {"plugin": "dit", "hidden_size": 100, "num_heads": 3})
    with pytest.raises(registry.ConfigError, match="patch_size"):
        dit(DIGITS, preset="DiT-digits", patch_size=3)


# --------------------------------------------------------------------------- adaLN-Zero
def test_adaln_zero_blocks_are_identities_and_the_output_is_zero_at_init():
    torch.manual_seed(0)
    model = dit(DIGITS, preset="DiT-digits").eval()
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 3, 9, 10])
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, 4, x.device)
    assert c.abs().sum() > 0
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    assert all(torch.equal(b.adaLN_modulation[-1].weight, torch.zeros_like(b.adaLN_modulation[-1].weight))
               for b in model.blocks)


def test_position_embedding_matches_mae_numpy():
    for dim, grid in [(384, 16), (64, 4), (1152, 2)]:
        ours = sincos_2d(dim, grid, grid)
        assert torch.allclose(ours, torch.from_numpy(_pos_embed_2d(dim, grid)).float(), atol=1e-6)
    model = dit(LATENT, preset="DiT-S/8", depth=1)
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(_pos_embed_2d(384, 4)).float(), atol=1e-6)


def test_state_dict_uses_dit_names():
    keys = set(dit(DIGITS, preset="DiT-digits", depth=1).state_dict())
    for key in ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert key in keys


# --------------------------------------------------------------------------- reference fidelity
@pytest.mark.parametrize("options,spec", [
    ({"preset": "DiT-digits", "learn_sigma": True}, DataSpec(shape=(4, 16, 16), num_classes=10)),
    ({"preset": "DiT-S/4", "depth": 2}, DataSpec(shape=(3, 16, 16))),
    ({"preset": "DiT-digits", "patch_size": 1, "depth": 2}, DIGITS),
])
def test_sdpa_attention_equals_the_explicit_softmax_reference(options, spec):
    torch.manual_seed(0)
    model = randomize(dit(spec, **options)).eval()
    ref = reference_for(model).eval()
    x, t = torch.randn(3, *spec.shape), torch.rand(3)
    y = torch.tensor([0, 5, spec.num_classes]) if spec.num_classes else None
    ours, theirs = model(x, t, y), ref(x, t, y)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # ... and the comparison sees the attention: a different head count changes the output
    ref.blocks[0].attn.num_heads = 1
    ref.blocks[0].attn.scale = model.config.hidden_size ** -0.5
    assert (ref(x, t, y) - ours).abs().max() > 1e-4


# --------------------------------------------------------------------------- labels, time, determinism
def test_null_label_class_dropout_and_eval_determinism():
    torch.manual_seed(0)
    model = randomize(dit(DIGITS, preset="DiT-digits", depth=2, class_dropout_prob=0.5))
    x, t, y = torch.randn(64, 1, 8, 8), torch.rand(64), torch.randint(0, 10, (64,))
    model.eval()
    uncond = model(x, t)
    assert torch.equal(uncond, model(x, t, torch.full((64,), 10)))  # y=None is the null label num_classes
    cond = model(x, t, y)
    assert torch.equal(cond, model(x, t, y))  # deterministic in eval mode: no label dropout
    assert (cond - uncond).abs().amax(dim=(1, 2, 3)).min() > 0
    model.train()
    torch.manual_seed(1)
    out = model(x, t, y)
    dropped = torch.isclose(out, uncond, atol=1e-6).flatten(1).all(1)
    kept = torch.isclose(out, cond, atol=1e-6).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # every example is either conditional or exactly the null-label output
    assert 10 < dropped.sum() < 54
    # the label embedder drops to the null row num_classes
    emb = model.y_embedder
    emb.dropout_prob = 0.999999
    torch.testing.assert_close(emb(y, 64, y.device), emb.embedding_table.weight[10].expand(64, -1))


def test_scalar_time_broadcasts():
    model = randomize(dit(DIGITS, preset="DiT-digits", depth=1)).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    full = model(x, torch.full((5,), 0.3), y)
    assert torch.equal(model(x, 0.3, y), full)
    assert torch.equal(model(x, torch.tensor(0.3), y), full)
    assert not torch.allclose(model(x, 0.7, y), full)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = dit(DIGITS, preset="DiT-digits", depth=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t, y = torch.randn(16, 1, 8, 8), torch.rand(16), torch.randint(0, 11, (16,))
    target = torch.randn_like(x)
    for _ in range(3):  # from zero-init: the output layer moves first, then the gates, then the rest
        opt.zero_grad()
        (model(x, t, y) - target).pow(2).mean().backward()
        opt.step()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == {"pos_embed"}
    for name, p in trained:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = randomize(dit(DIGITS, preset="DiT-digits", depth=2))
    b = randomize(dit(DIGITS, preset="DiT-digits", depth=2))
    b.gradient_checkpointing = True  # what the trainer's gradient_checkpointing option sets
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    for m in (a, b):
        m(x, t, y).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.requires_grad:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------- other data layouts
def test_discrete_images_give_logits_over_the_vocabulary():
    spec = DataSpec(shape=(3, 8, 8), kind="discrete", vocab_size=17, num_classes=10)
    model = randomize(dit(spec, preset="DiT-digits", depth=1))
    x = torch.randint(0, 17, (2, 3, 8, 8))
    logits = model(x, torch.rand(2), torch.tensor([1, 10]))
    assert logits.shape == (2, 3, 8, 8, 17) and logits.dtype == torch.float32
    # the logits at a pixel depend on that pixel's token
    x2 = x.clone()
    x2[0, 1, 5, 6] = (x2[0, 1, 5, 6] + 1) % 17
    diff = (model(x2, torch.rand(2) * 0 + 0.5, torch.tensor([1, 10])) -
            model(x, torch.rand(2) * 0 + 0.5, torch.tensor([1, 10]))).abs()
    assert diff[0].sum() > 0 and diff[1].sum() == 0


def test_discrete_sequences_are_a_bidirectional_token_transformer():
    spec = DataSpec(shape=(32,), kind="discrete", vocab_size=28)
    model = randomize(dit(spec, preset="DiT-digits", patch_size=1, depth=2)).eval()
    assert model.x_embedder.embedding.weight.shape == (28, 128)  # token embedding straight to the width
    x = torch.randint(0, 28, (3, 32))
    logits = model(x, torch.rand(3))
    assert logits.shape == (3, 32, 28)
    # bidirectional: changing the last token changes the logits at the first position
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 28
    t = torch.full((3,), 0.5)
    assert (model(x2, t)[:, 0] - model(x, t)[:, 0]).abs().sum() > 0
    logits.sum().backward()


def test_continuous_sequences_and_rectangular_images():
    seq = dit(DataSpec(shape=(2, 12)), preset="DiT-digits", depth=1, learn_sigma=True)
    assert seq(torch.randn(3, 2, 12), torch.rand(3)).shape == (3, 4, 12)
    flat = dit(DataSpec(shape=(12,)), preset="DiT-digits", depth=1, patch_size=3)
    assert flat(torch.randn(3, 12), torch.rand(3)).shape == (3, 12)
    rect = randomize(dit(DataSpec(shape=(2, 8, 16)), preset="DiT-digits", depth=1))
    x = torch.randn(3, 2, 8, 16)
    assert rect(x, torch.rand(3)).shape == (3, 2, 8, 16)
    assert rect.pos_embed.shape == (1, 4 * 8, 128)
    assert np.isfinite(rect(x, 0.5).detach().numpy()).all()
