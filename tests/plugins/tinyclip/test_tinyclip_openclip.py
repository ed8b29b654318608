"""OpenAI CLIP / open_clip / TinyCLIP state dicts load into flowforge's CLIP (plugins/tinyclip/openclip.py).

The reference below is written here from OpenAI CLIP's model definition (clip/model.py semantics:
sequence-first nn.MultiheadAttention blocks with a fused in_proj, QuickGELU MLPs c_fc/c_proj, an
additive -inf causal mask for text, class token + positional embedding + ln_pre for images,
``x @ proj`` projections, text pooled at the largest token id); its state dict has OpenAI's keys.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import registry
from core.interfaces import DataSpec
from plugins.tinyclip.load import load_clip
from plugins.tinyclip.openclip import load_openai_clip, openai_to_flowforge
from registry import ConfigError


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)
        self.mask = mask

    def forward(self, x):  # (L, N, D)
        y = self.ln_1(x)
        mask = None if self.mask is None else self.mask[:len(x), :len(x)]
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefViT(nn.Module):
    def __init__(self, size, patch, width, layers, heads, embed):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class RefCLIP(nn.Module):
    def __init__(self, embed=24, size=16, patch=4, vwidth=128, vlayers=2, vheads=2, context=12, vocab=50,
                 twidth=64, tlayers=2, theads=1):
        super().__init__()
        self.visual = RefViT(size, patch, vwidth, vlayers, vheads, embed)
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.transformer = RefTransformer(twidth, tlayers, theads, mask)
        self.token_embedding = nn.Embedding(vocab, twidth)
        self.positional_embedding = nn.Parameter(torch.randn(context, twidth))
        self.ln_final = nn.LayerNorm(twidth)
        self.text_projection = nn.Parameter(torch.randn(twidth, embed))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # every parameter random (biases and norms too), so a wrong mapping shows
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim < 2 else p.shape[-1] ** -0.5)
                        + (1.0 if p.ndim == 1 else 0.0) * 0.1)

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]]
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def inputs(size=16, context=12, vocab=50, n=5):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    text = torch.randint(1, vocab - 1, (n, context), generator=g)
    lengths = torch.tensor([3, 12, 7, 1, 5])
    text[torch.arange(n), lengths - 1] = vocab - 1  # end-of-text, the largest id; zeros after it
    text[torch.arange(context)[None] >= lengths[:, None]] = 0
    return images, text


def assert_same_features(model, ref):
    images, text = inputs()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.visual(images), ref.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.text(text), ref.encode_text(text), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale, ref.logit_scale)


@pytest.fixture(scope="module")
def ref():
    return RefCLIP().eval()


def test_openai_layout_from_a_pt_file(tmp_path, ref):
    torch.save({**ref.state_dict(), "input_resolution": torch.tensor(16), "vocab_size": torch.tensor(50)},
               tmp_path / "ViT-tiny.pt")
    model = load_openai_clip(tmp_path / "ViT-tiny.pt")  # OpenAI's rule: width // 64 heads, QuickGELU
    d = model.dims
    assert (d.vision.width, d.vision.depth, d.vision.heads, d.vision.mlp_width) == (128, 2, 2, 512)
    assert (d.text.width, d.text.depth, d.text.heads, d.text.vocab_size, d.text.context_length) == (64, 2, 1, 50, 12)
    assert (d.embed_dim, d.vision.patch_size, d.vision.image_size, d.activation) == (24, 4, 16, "quick_gelu")
    assert_same_features(model, ref)


def test_open_clip_safetensors_with_module_prefix_and_a_model_config(tmp_path):
    from safetensors.torch import save_file

    ref = RefCLIP(vheads=4, theads=2).eval()
    save_file({f"module.{k}": v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "quick_gelu": True, "vision_cfg": {"width": 128, "head_width": 32},
        "text_cfg": {"width": 64, "heads": 2}}}))
    model = load_openai_clip(tmp_path / "w.safetensors")
    assert (model.dims.vision.heads, model.dims.text.heads) == (4, 2)
    assert_same_features(model, ref)


def test_tinyclip_layout_wrapped_in_a_training_checkpoint(tmp_path, ref):
    def tiny(key):
        if key.startswith("visual."):
            return f"_image_encoder.module.{key}"
        return "_logit_scale.module.logit_scale" if key == "logit_scale" else f"_text_encoder.module.{key}"

    torch.save({"epoch": 3, "state_dict": {tiny(k): v for k, v in ref.state_dict().items()}}, tmp_path / "tiny.pt")
    assert_same_features(load_openai_clip(tmp_path / "tiny.pt"), ref)


def test_open_clip_custom_text_layout(tmp_path, ref):
    state = {(k if k.startswith("visual.") or k == "logit_scale" else f"text.{k}"): v
             for k, v in ref.state_dict().items()}
    torch.save(state, tmp_path / "custom.pt")
    assert_same_features(load_openai_clip(tmp_path / "custom.pt"), ref)


def test_as_teacher_and_as_initialisation(tmp_path, ref):
    torch.save(ref.state_dict(), tmp_path / "teacher.pt")
    spec = DataSpec(shape=(3, 16, 16), vocab_size=50, extra={"context_length": 12, "eot_token": 49})
    assert_same_features(load_clip(tmp_path / "teacher.pt", spec), ref)  # the distillation teacher's loader
    student = registry.build("backbone", {"plugin": "clip", "embed_dim": 24, "vision_width": 128, "vision_heads": 2,
                                          "text_width": 64, "text_heads": 1, "depth": 2, "patch_size": 4,
                                          "activation": "quick_gelu", "text_pool": "argmax",
                                          "inherit_from": str(tmp_path / "teacher.pt")}, spec=spec)
    assert_same_features(student, ref)


def test_unsupported_or_unreadable_checkpoints_are_config_errors(tmp_path, ref):
    torch.save({**ref.state_dict(), "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128)}, tmp_path / "ls.pt")
    with pytest.raises(ConfigError, match="ls_1.gamma"):
        load_openai_clip(tmp_path / "ls.pt")
    torch.save(ref.state_dict(), tmp_path / "attn_pool.pt")
    (tmp_path / "attn_pool.json").write_text(json.dumps({"vision_cfg": {"attentional_pool": True}}))
    with pytest.raises(ConfigError, match="attentional_pool"):
        load_openai_clip(tmp_path / "attn_pool.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_openai_clip(tmp_path / "junk.pt")
    with warnings.catch_warnings():  # deprecated (the warning may already have been shown), but how OpenAI wrote its files
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    with pytest.raises(ConfigError, match="TorchScript archive"):
        load_openai_clip(tmp_path / "scripted.pt")
    state = ref.state_dict()
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(256, 128)
    state["visual.transformer.resblocks.1.mlp.c_fc.bias"] = torch.zeros(256)
    state["visual.transformer.resblocks.1.mlp.c_proj.weight"] = torch.zeros(128, 256)
    torch.save(state, tmp_path / "pruned.pt")
    with pytest.raises(ConfigError, match="differ in size"):
        load_openai_clip(tmp_path / "pruned.pt")
    with pytest.raises(ConfigError, match="not a CLIP"):
        load_openai_clip(_save(tmp_path / "half.pt", {"logit_scale": torch.tensor(1.0)}))
    assert "visual.proj.weight" in openai_to_flowforge(ref.state_dict())


def _save(path, state):
    torch.save(state, path)
    return path
