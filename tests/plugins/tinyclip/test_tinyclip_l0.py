"""Automatic inheritance (plugins/tinyclip/l0.py, prune.py): hard-concrete statistics against their
closed forms, the sparsity penalty and schedule, and the pruned dense CLIP against the masked model."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

from plugins.tinyclip.l0 import LEFT, RIGHT, CLIPMasks, HardConcrete, SparsitySchedule
from plugins.tinyclip.model import CLIP, CLIPDims, TowerDims
from plugins.tinyclip.prune import masked_features, prune


def make_clip(activation="gelu", seed=0):
    torch.manual_seed(seed)
    dims = CLIPDims(vision=TowerDims(32, 3, 4, 64, patch_size=4, image_size=8, channels=3),
                    text=TowerDims(24, 2, 3, 40, vocab_size=30, context_length=7), embed_dim=12,
                    activation=activation)
    model = CLIP(dims).eval()
    with torch.no_grad():  # random norms and biases too, so every folded factor matters
        for name, p in model.named_parameters():
            if p.ndim == 1 and "embedding" not in name:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("ln_1.weight") else 0.0))
    return model


def inputs():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(1, 28, (4, 7), generator=g)
    tokens[torch.arange(4), torch.tensor([6, 3, 2, 5])] = 29
    return torch.randn(4, 3, 8, 8, generator=g), tokens


def random_masks(model, seed=0):
    """Mask values in (0, 1] with many exact zeros, a layer without attention, one without an MLP and
    a text layer with neither."""
    g = torch.Generator().manual_seed(seed)

    def gate(*shape, p=0.35):
        return torch.where(torch.rand(shape, generator=g) < p, 0.0, 0.2 + 0.8 * torch.rand(shape, generator=g))

    out = {}
    for tower, d in (("visual", model.dims.vision), ("text", model.dims.text)):
        m = {"hidden": gate(d.width), "heads": gate(d.depth, d.heads), "intermediate": gate(d.depth, d.mlp_width),
             "mha": 0.5 + 0.5 * torch.rand(d.depth, generator=g), "ffn": 0.5 + 0.5 * torch.rand(d.depth, generator=g)}
        out[tower] = m
    out["visual"]["mha"][1] = 0.0
    out["visual"]["ffn"][2] = 0.0
    out["visual"]["heads"][0] = torch.tensor([0.0, 0.0, 0.0, 0.7])
    out["text"]["mha"][0] = out["text"]["ffn"][0] = 0.0
    return out


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_pruned_model_equals_the_masked_model(activation):
    model = make_clip(activation)
    masks = random_masks(model)
    image, tokens = inputs()
    with torch.no_grad():
        want_image, want_text = masked_features(model, image, tokens, masks)
        student = prune(model, masks).eval()
        got_image, got_text = student.visual(image), student.text(tokens)
    torch.testing.assert_close(got_image, want_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)
    v, t = student.dims.vision, student.dims.text
    assert v.width == int((masks["visual"]["hidden"] != 0).sum()) and v.depth == 3 and v.head_dim == 8
    assert t.depth == 1  # the text layer with neither sublayer is gone
    assert sum(p.numel() for p in student.parameters()) < 0.6 * sum(p.numel() for p in model.parameters())


def test_all_ones_masks_are_the_model_and_pruning_them_copies_it():
    model = make_clip()
    image, tokens = inputs()
    with torch.no_grad():
        masked = masked_features(model, image, tokens, {})
        torch.testing.assert_close(masked[0], model.visual(image), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(masked[1], model.text(tokens), atol=1e-5, rtol=1e-5)
        same = prune(model, {})
        assert same.dims == model.dims
        torch.testing.assert_close(same.visual(image), model.visual(image), atol=1e-5, rtol=1e-5)


def test_hard_concrete_matches_its_closed_forms():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    draws = HardConcrete((20000, 5))
    with torch.no_grad():
        draws.log_alpha.copy_(log_alpha.expand(20000, 5))
    z = draws.sample().detach()
    assert z.min() >= 0 and z.max() <= 1
    gate = HardConcrete((5,), "all")
    with torch.no_grad():
        gate.log_alpha.copy_(log_alpha)
    p = gate.keep_probability().detach()
    # P(z != 0) = sigmoid(log_alpha - beta log(-l/r)); P(z = 1) = 1 - sigmoid(beta log((1 - l)/(r - 1)) - log_alpha)
    assert torch.allclose((z > 0).float().mean(0), p, atol=4 * math.sqrt(0.25 / 20000))
    ones = 1 - torch.sigmoid(2 / 3 * math.log((1 - LEFT) / (RIGHT - 1)) - gate.log_alpha.detach())
    assert torch.allclose((z == 1).float().mean(0), ones, atol=4 * math.sqrt(0.25 / 20000))
    gate.eval()
    det = gate()
    assert int((det == 0).sum()) == round(5 - float(p.sum()))
    assert round(5 - float(p.sum())) == 1 and det[0] == 0 and (det[1:] > 0).all()  # the smallest log_alpha goes


def test_expected_sparsity_is_the_mean_kept_fraction_under_sampled_masks():
    torch.manual_seed(1)
    model = make_clip()
    masks = CLIPMasks(model, SparsitySchedule(0.5))
    with torch.no_grad():
        for tower in (masks.visual, masks.text):
            for gate in tower.gates().values():
                gate.log_alpha.uniform_(-2, 3)
    kept = []
    for _ in range(400):
        total = 0.0
        for tower in (masks.visual, masks.text):
            z = {k: (g.sample() > 0).float() for k, g in tower.gates().items()}
            heads = (z["heads"] * z["mha"][:, None]).sum()
            units = (z["intermediate"] * z["ffn"][:, None]).sum()
            total += z["hidden"].sum() * (4 * tower.dims.head_dim * heads + 2 * units)
        kept.append(float(total) / (masks.visual.full() + masks.text.full()))
    kept = torch.tensor(kept)
    assert abs((1 - kept.mean()) - float(masks.expected_sparsity().detach())) < 4 * kept.std() / 20 + 0.01


def test_penalty_schedule_and_that_the_mask_statistics_follow_the_target():
    schedule = SparsitySchedule(target=0.6, start=0.1, warmup=100)
    assert [schedule(s) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 0.35, 0.6, 0.6])
    torch.manual_seed(0)
    model = make_clip()
    masks = CLIPMasks(model, schedule)
    loss, expected, target = masks.penalty(0)
    assert expected < 0.01 and target == pytest.approx(0.1) and float(loss.detach()) > 0
    # a task loss that wants every weight kept, against the penalty: log_alpha descends, the lambdas ascend
    alphas = [p for n, p in masks.named_parameters() if "log_alpha" in n]
    opt, lagrange = torch.optim.Adam(alphas, lr=0.05), torch.optim.SGD([masks.lambda_1, masks.lambda_2], lr=0.5)
    trace = []
    for step in range(300):
        loss, expected, target = masks.penalty(step)
        opt.zero_grad()
        lagrange.zero_grad()
        (loss - (1 - masks.expected_sparsity())).backward()
        for lam in (masks.lambda_1, masks.lambda_2):
            lam.grad.neg_()
        opt.step()
        lagrange.step()
        masks.constrain()
        trace.append((expected, target))
    assert all(abs(e - t) < 0.03 for e, t in trace[150:]), trace[150::10]  # at the target once warmed up
    assert float(masks.lambda_1.detach()) > 10  # the multiplier grew while the sparsity lagged behind
    masks.eval()
    pruned = prune(model, masks())
    fraction = sum(p.numel() for n, p in pruned.named_parameters() if ".blocks." in n and p.ndim == 2) / \
        sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n and p.ndim == 2)
    assert fraction < 0.75  # pruning with the deterministic masks removes a large share of the block weights


def test_the_pruned_student_is_saved_and_distillation_can_start_from_it(tmp_path):
    import registry
    from core.interfaces import DataSpec
    from plugins.tinyclip.load import load_clip
    from plugins.tinyclip.prune import backbone_options, save_student

    model = make_clip()
    student = prune(model, random_masks(model, seed=3)).eval()
    save_student(student, tmp_path / "pruned")
    spec = DataSpec(shape=(3, 8, 8), vocab_size=30, extra={"context_length": 7, "eot_token": 29})
    image, tokens = inputs()
    with torch.no_grad():
        loaded = load_clip(tmp_path / "pruned", spec, weights="model").eval()
        assert attrs.evolve(loaded.dims, eot_token=-1) == student.dims and loaded.dims.eot == student.dims.eot
        torch.testing.assert_close(loaded.visual(image), student.visual(image))
        options = {**backbone_options(student), "inherit_from": str(tmp_path / "pruned"), "inherit_weights": "model"}
        again = registry.build("backbone", options, spec=spec).eval()
        torch.testing.assert_close(again.text(tokens), student.text(tokens))
