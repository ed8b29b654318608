"""TinyCLIP plugins: model, losses, cached accumulation, weight inheritance, HF adapter, data, zero-shot metric."""

from __future__ import annotations

import copy
import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import registry
from core.data import TensorDataSource
from core.interfaces import DataSpec
from plugins.tinyclip import hf
from plugins.tinyclip.data import read_pairs
from plugins.tinyclip.inherit import inherit, inherited_state, layer_indices
from plugins.tinyclip.losses import (
    ClipContrastive,
    ContrastiveConfig,
    DistillConfig,
    TinyCLIPDistill,
    affinity_loss,
    cached_loss,
    clip_logits,
    contrastive_loss,
    gather_features,
    soft_cross_entropy,
)
from plugins.tinyclip.model import CLIP, CLIPDims, TowerDims
from plugins.tinyclip.tokenizer import WordTokenizer
from plugins.tinyclip.zeroshot import ZeroShot, ZeroShotConfig
from registry import ConfigError


def make_clip(width=32, depth=2, heads=2, embed=16, patch=4, size=8, channels=3, vocab=40, context=8, mlp=None,
              activation="gelu", seed=0) -> CLIP:
    torch.manual_seed(seed)
    dims = CLIPDims(
        vision=TowerDims(width, depth, heads, mlp or 4 * width, patch_size=patch, image_size=size, channels=channels),
        text=TowerDims(width, depth, heads, mlp or 4 * width, vocab_size=vocab, context_length=context),
        embed_dim=embed, activation=activation)
    return CLIP(dims)


def make_batch(n=12, size=8, channels=3, vocab=40, context=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, channels, size, size, generator=g)
    sot, eot = vocab - 2, vocab - 1  # the layout of WordTokenizer
    text = torch.randint(2, vocab - 2, (n, context), generator=g)
    lengths = torch.randint(2, context, (n,), generator=g)
    text[:, 0] = sot
    for i, end in enumerate(lengths.tolist()):
        text[i, end] = eot
        text[i, end + 1:] = 0
    return image, text


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- model and tokenizer
def test_tokenizer_round_trip_and_truncation(tmp_path):
    tok = WordTokenizer(["a", "red", "circle"], context_length=5)
    ids = tok.encode(["A red, circle!", "a red red red red circle", "blue"])
    assert ids.shape == (3, 5)
    sot, eot = tok.sot, tok.eot
    assert (sot, eot, tok.vocab_size) == (5, 6, 7)  # <pad> <unk> a red circle <sot> <eot>
    assert ids[0].tolist() == [sot, 2, 3, 4, eot]
    assert ids[1].tolist() == [sot, 2, 3, 3, eot]  # truncated, still ends with <eot>
    assert ids[2].tolist() == [sot, 1, eot, 0, 0]  # unknown word
    assert tok.decode(ids[:1]) == ["a red circle"]
    tok.save(tmp_path / "vocab.txt")
    assert WordTokenizer.from_file(tmp_path / "vocab.txt", 5).itos == tok.itos
    with pytest.raises(ConfigError, match="duplicate"):
        WordTokenizer(["a", "a"], 5)


def test_clip_shapes_and_logit_scale():
    model = make_clip()
    image, text = make_batch()
    img, txt, scale = model(image, text)
    assert img.shape == txt.shape == (12, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(12), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(12), atol=1e-5)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)


def test_text_pools_at_first_eot_and_ignores_later_tokens():
    model = make_clip().eval()
    _, text = make_batch(n=4)
    changed = text.clone()
    for i in range(4):
        end = int((text[i] == 39).nonzero()[0])
        changed[i, end + 1:] = 7  # causal attention: tokens after <eot> cannot matter
    assert torch.allclose(model.encode_text(text), model.encode_text(changed), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_clip()
    image, text = make_batch()
    contrastive_loss(*model(image, text)).backward()
    plain = grads(model)
    model.zero_grad()
    from core.trainer import enable_gradient_checkpointing

    assert enable_gradient_checkpointing(model) == 2  # trainer.gradient_checkpointing = true reaches both towers
    contrastive_loss(*model(image, text)).backward()
    for k, g in grads(model).items():
        assert torch.allclose(g, plain[k], atol=1e-6), k


def test_backbone_builds_from_the_registry_with_data_defaults():
    spec = DataSpec(shape=(3, 8, 8), vocab_size=30, extra={"context_length": 6, "eot_token": 29})
    model = registry.build("backbone", {"plugin": "clip", "width": 32, "depth": 1, "vision_depth": 2,
                                        "embed_dim": 8}, spec=spec)
    assert model.dims.vision.depth == 2 and model.dims.text.depth == 1
    assert model.dims.text.context_length == 6 and model.dims.text.vocab_size == 30
    with pytest.raises(ConfigError, match="patch_size"):
        registry.build("backbone", {"plugin": "clip", "patch_size": 3}, spec=spec)
    with pytest.raises(ConfigError, match="heads"):
        registry.build("backbone", {"plugin": "clip", "width": 30, "heads": 4}, spec=spec)


# --------------------------------------------------------------------------- losses
def test_contrastive_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    logits = 10.0 * img @ txt.T
    expected = 0.0
    for i in range(6):
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    assert torch.allclose(contrastive_loss(img, txt, 10.0), expected / 12, atol=1e-6)


def test_affinity_loss_is_kl_plus_teacher_entropy_and_minimal_at_the_teacher():
    g = torch.Generator().manual_seed(0)
    s_img, s_txt = (F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_() for _ in range(2))
    t_img, t_txt = (F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_() for _ in range(2))
    s_scale, t_scale = torch.tensor(7.0, requires_grad=True), torch.tensor(20.0, requires_grad=True)
    loss = affinity_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    a_img, a_txt, _ = clip_logits(s_img, s_txt, s_scale)
    b_img, b_txt, _ = clip_logits(t_img, t_txt, t_scale)
    expected = 0.0
    for a, b in ((a_img, b_img), (a_txt, b_txt)):
        p, logp, logq = b.softmax(-1), b.log_softmax(-1), a.log_softmax(-1)
        kl = (p * (logp - logq)).sum(-1).mean()
        entropy = -(p * logp).sum(-1).mean()
        expected = expected + (kl + entropy) / 2
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert s_img.grad is not None and s_scale.grad is not None
    assert t_img.grad is None and t_txt.grad is None and t_scale.grad is None  # nothing flows into the teacher

    # minimal when the student's affinities equal the teacher's: the loss is the teacher's entropy there,
    # its gradient vanishes, and any perturbation increases it
    teacher = torch.randn(8, 8, generator=g) * 3
    entropy = -(teacher.softmax(-1) * teacher.log_softmax(-1)).sum(-1).mean()
    student = teacher.clone().requires_grad_()
    at_teacher = soft_cross_entropy(student, teacher)
    at_teacher.backward()
    assert torch.allclose(at_teacher, entropy, atol=1e-5)
    assert student.grad.abs().max() < 1e-6
    for _ in range(20):
        other = teacher + torch.randn(8, 8, generator=g)
        assert soft_cross_entropy(other, teacher) > at_teacher


def test_gather_is_a_no_op_on_one_process():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_features(x) is x


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cached_accumulation_equals_the_whole_batch(checkpointing):
    model = make_clip()
    model.set_grad_checkpointing(checkpointing)
    image, text = make_batch(n=12)
    objective = ClipContrastive(ContrastiveConfig())
    whole, _ = objective.loss({"model": model}, {"image": image, "text": text}, 0)
    whole.backward()
    expected = grads(model)
    for chunks in (2, 3, 5):
        model.zero_grad()
        objective = ClipContrastive(ContrastiveConfig(accum_chunks=chunks))
        loss, _ = objective.loss({"model": model}, {"image": image, "text": text}, 0)
        assert torch.allclose(loss, whole, atol=1e-5), (chunks, loss, whole)
        (loss / 2).backward()  # the trainer divides by its own micro-batch count: gradients must follow
        got = grads(model)
        assert got.keys() == expected.keys()
        for k, g in got.items():
            assert torch.allclose(2 * g, expected[k], atol=1e-5, rtol=1e-4), (chunks, k)
    assert "logit_scale" in expected


def test_cached_accumulation_of_the_distillation_loss():
    teacher, student = make_clip(seed=3), make_clip(width=16, heads=1, seed=4)
    image, text = make_batch(n=8)
    spec = DataSpec(shape=(3, 8, 8))
    losses = []
    for chunks in (1, 4):
        student.zero_grad()
        cfg = DistillConfig(teacher="(in memory)", alpha=0.7, weight=2.0, teacher_logit_scale=50.0, accum_chunks=chunks)
        objective = TinyCLIPDistill(cfg, spec, teacher=teacher)
        loss, logs = objective.loss({"model": student}, {"image": image, "text": text}, 0)
        loss.backward()
        losses.append((loss.detach(), grads(student), logs))
    (l1, g1, logs), (l4, g4, _) = losses
    assert torch.allclose(l1, l4, atol=1e-5)
    assert set(logs) == {"logit_scale", "affinity", "contrastive"}
    assert math.isclose(float(l1), 2.0 * (0.7 * logs["affinity"] + 0.3 * logs["contrastive"]), rel_tol=1e-5)
    for k in g1:
        assert torch.allclose(g1[k], g4[k], atol=1e-5, rtol=1e-4), k
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_cached_loss_rejects_more_chunks_than_examples():
    model = make_clip()
    image, text = make_batch(n=2)
    with pytest.raises(ValueError, match="chunks"):
        cached_loss(model, image, text, lambda i, t, s: (contrastive_loss(i, t, s), {}), 3)


# --------------------------------------------------------------------------- weight inheritance
def test_full_size_inheritance_reproduces_the_teacher():
    teacher, student = make_clip(seed=0).eval(), make_clip(seed=1).eval()
    inherit(student, teacher)
    image, text = make_batch()
    assert torch.equal(student.encode_image(image), teacher.encode_image(image))
    assert torch.equal(student.encode_text(text), teacher.encode_text(text))
    assert torch.equal(student.logit_scale, teacher.logit_scale)


def test_smaller_students_keep_the_teachers_slices_per_head():
    teacher = make_clip(width=32, depth=4, heads=4, embed=16, seed=0)  # head size 8
    student = make_clip(width=16, depth=2, heads=2, embed=12, seed=1)  # half the heads, same size
    state = inherited_state(student, teacher)
    t = teacher.state_dict()
    assert layer_indices(4, 2) == [0, 2]
    assert torch.equal(state["visual.blocks.1.attn.qkv.weight"],
                       t["visual.blocks.2.attn.qkv.weight"].view(3, 4, 8, 32)[:, :2, :, :16].reshape(48, 16))
    assert torch.equal(state["text.blocks.0.attn.qkv.bias"],
                       t["text.blocks.0.attn.qkv.bias"].view(3, 4, 8)[:, :2].reshape(48))
    # the q, k and v of the kept heads come from the q, k and v parts of the fused matrix
    q, k, v = t["text.blocks.2.attn.qkv.weight"].chunk(3)
    sq, sk, sv = state["text.blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(sq, q[:16, :16]) and torch.equal(sk, k[:16, :16]) and torch.equal(sv, v[:16, :16])
    assert torch.equal(state["visual.blocks.0.attn.proj.weight"],
                       t["visual.blocks.0.attn.proj.weight"].view(32, 4, 8)[:16, :2].reshape(16, 16))
    for name in ("visual.blocks.1.mlp.fc1.weight", "visual.blocks.1.ln_2.bias", "text.blocks.1.mlp.fc2.weight"):
        source = name.replace("blocks.1", "blocks.2")
        assert torch.equal(state[name], t[source][tuple(slice(0, s) for s in state[name].shape)]), name
    for name in ("visual.conv.weight", "visual.positional_embedding", "visual.proj.weight",
                 "text.token_embedding.weight", "text.proj.weight"):
        assert torch.equal(state[name], t[name][tuple(slice(0, s) for s in state[name].shape)]), name
    # explicit layer lists, per tower
    state = inherited_state(student, teacher, vision_layers=[3, 1], text_layers=[1, 3])
    assert torch.equal(state["visual.blocks.0.ln_1.weight"], t["visual.blocks.3.ln_1.weight"][:16])
    assert torch.equal(state["text.blocks.1.ln_1.weight"], t["text.blocks.3.ln_1.weight"][:16])
    inherit(student, teacher)  # loads
    assert torch.equal(student.text.blocks[1].mlp.fc1.bias, teacher.text.blocks[2].mlp.fc1.bias[:64])


def test_inheritance_errors_are_config_errors():
    teacher = make_clip(width=32, heads=4, seed=0)
    with pytest.raises(ConfigError, match="patch"):
        inherit(make_clip(patch=2), teacher)
    with pytest.raises(ConfigError, match="larger|heads"):
        inherit(make_clip(width=64, heads=8), teacher)
    with pytest.raises(ConfigError, match="heads"):
        inherit(make_clip(width=16, heads=1), teacher)  # one head of 16 from heads of 8
    with pytest.raises(ConfigError, match="one teacher index per student block"):
        inherit(make_clip(width=16, heads=2), teacher, vision_layers=[0])
    with pytest.raises(ConfigError, match="outside"):
        inherit(make_clip(width=16, heads=2), teacher, text_layers=[0, 5])
    with pytest.raises(ConfigError, match="cannot inherit 3 blocks"):
        inherit(make_clip(width=16, heads=2, depth=3), teacher)


# --------------------------------------------------------------------------- Hugging Face adapter
def test_hf_directory_round_trip(tmp_path):
    model = make_clip(activation="quick_gelu", mlp=37).eval()
    hf.save_hf_clip(model, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["text_config"]["intermediate_size"] == 37
    from plugins.tinyclip.load import load_clip

    loaded = load_clip(tmp_path / "hf", DataSpec(shape=(3, 8, 8))).eval()
    image, text = make_batch()
    assert torch.allclose(loaded.encode_image(image), model.encode_image(image), atol=1e-6)
    assert torch.allclose(loaded.encode_text(text), model.encode_text(text), atol=1e-6)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_clip(tmp_path / "hf", DataSpec(shape=(3, 8, 8)))


def _tiny_hf_config(eos_token_id: int):
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=10, eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=12,
                  patch_size=4, num_channels=3)
    return transformers, transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.mark.parametrize("eos_token_id", [49, 2])
def test_hf_adapter_matches_transformers(tmp_path, eos_token_id):
    transformers, config = _tiny_hf_config(eos_token_id)
    torch.manual_seed(0)
    reference = transformers.CLIPModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    from plugins.tinyclip.load import load_clip

    ours = load_clip(tmp_path / "hf", DataSpec(shape=(3, 12, 12))).eval()
    assert ours.dims.text_pool == ("argmax" if eos_token_id == 2 else "eot")
    g = torch.Generator().manual_seed(0)
    image = torch.randn(5, 3, 12, 12, generator=g)
    ids = torch.randint(3, 40, (5, 10), generator=g)
    for i, end in enumerate([3, 9, 5, 1, 6]):
        ids[i, end] = 49  # the end of text, also the largest id (the legacy rule of eos_token_id = 2 pools there)
        ids[i, end + 1:] = 0
    with torch.no_grad():
        ref_img = F.normalize(reference.get_image_features(pixel_values=image).pooler_output, dim=-1)
        ref_txt = F.normalize(reference.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert torch.allclose(ours.encode_image(image), ref_img, atol=1e-5)
    assert torch.allclose(ours.encode_text(ids), ref_txt, atol=1e-5)
    assert torch.allclose(ours.logit_scale, reference.logit_scale)


def test_flowforge_export_loads_into_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    model = make_clip(activation="quick_gelu", vocab=40).eval()
    hf.save_hf_clip(model, tmp_path / "hf")
    config = transformers.CLIPConfig.from_dict(json.loads((tmp_path / "hf" / "config.json").read_text()))
    reference = transformers.CLIPModel(config).eval()
    missing, unexpected = reference.load_state_dict(load_file(str(tmp_path / "hf" / "model.safetensors")), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    image, text = make_batch()
    with torch.no_grad():
        ref = F.normalize(reference.get_text_features(input_ids=text).pooler_output, dim=-1)
        ref_img = F.normalize(reference.get_image_features(pixel_values=image).pooler_output, dim=-1)
    assert torch.allclose(model.encode_text(text), ref, atol=1e-5)
    assert torch.allclose(model.encode_image(image), ref_img, atol=1e-5)


# --------------------------------------------------------------------------- zero-shot metric
CLASSES = ["cat", "dog", "bird", "fish", "frog", "horse", "ship", "truck"]


class _Oracle(nn.Module):
    """Images carry their label in pixel [0, 0, 0]; captions name their class: a perfect embedding."""

    def __init__(self, tokenizer: WordTokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode_image(self, image):
        return F.one_hot(image[:, 0, 0, 0].round().long(), len(CLASSES)).float()

    def encode_text(self, tokens):
        ids = torch.tensor([self.tokenizer.stoi[c] for c in CLASSES])
        return (tokens[:, :, None] == ids).any(1).float()


class _Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.g = torch.Generator().manual_seed(0)

    def encode_image(self, image):
        return torch.randn(len(image), 32, generator=self.g)

    def encode_text(self, tokens):
        return torch.randn(len(tokens), 32, generator=self.g)


def _labelled_data(n=400):
    templates = ["a photo of a {}", "a picture of the {}"]
    tok = WordTokenizer.from_texts([t.format(c) for t in templates for c in CLASSES], 8)
    label = torch.arange(n) % len(CLASSES)
    image = torch.zeros(n, 1, 4, 4)
    image[:, 0, 0, 0] = label.float()
    text = tok.encode([templates[0].format(CLASSES[i]) for i in label.tolist()])
    split = {"image": image, "text": text, "label": label}
    spec = DataSpec(shape=(1, 4, 4), num_classes=len(CLASSES), vocab_size=tok.vocab_size,
                    extra={"tokenizer": tok, "class_names": CLASSES, "templates": templates, "context_length": 8})
    return TensorDataSource(split, split, spec), tok


def test_zero_shot_of_an_oracle_is_perfect_and_of_random_embeddings_is_chance():
    data, tok = _labelled_data()
    metric = ZeroShot(ZeroShotConfig(num_examples=400, batch_size=64))
    perfect = metric.evaluate(_Oracle(tok), data, torch.Generator().manual_seed(0))
    assert perfect == {"top1": 1.0, "top5": 1.0, "i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    chance = metric.evaluate(_Random(), data, torch.Generator().manual_seed(0))
    assert abs(chance["top1"] - 1 / 8) < 0.06
    assert abs(chance["top5"] - 5 / 8) < 0.08
    assert abs(chance["i2t_r1"] - 1 / 8) < 0.06  # 8 distinct captions, 50 copies each


def test_zero_shot_metric_is_registered_and_evaluates_a_clip():
    data = registry.build("data", {"plugin": "clip_shapes", "train_size": 64, "held_out_size": 50})
    metric = registry.build("metric", {"plugin": "zero_shot", "num_examples": 500}, spec=data.spec, data=data)
    model = registry.build("backbone", {"plugin": "clip", "width": 32, "depth": 1}, spec=data.spec)
    out = metric.evaluate(model, data, torch.Generator().manual_seed(0))
    assert set(out) == {"top1", "top5", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert model.training  # restored


# --------------------------------------------------------------------------- data
def _write_images(folder, n):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 12), color=(10 * i, 255 - 10 * i, 40)).save(folder / f"im{i}.png")


def test_csv_and_jsonl_pairs_are_read(tmp_path):
    _write_images(tmp_path / "images", 6)
    captions = ["a red square", "a green circle", "a blue circle", "the red cross", "a big square", "one circle"]
    with open(tmp_path / "pairs.csv", "w") as fh:
        fh.write("filepath,caption,label\n")
        fh.writelines(f"images/im{i}.png,\"{c}\",{'circle' if 'circle' in c else 'square'}\n" for i, c in enumerate(captions))
    with open(tmp_path / "pairs.jsonl", "w") as fh:
        fh.writelines(json.dumps({"filepath": str(tmp_path / "images" / f"im{i}.png"), "caption": c}) + "\n" for i, c in enumerate(captions))
    data = registry.build("data", {"plugin": "clip_pairs", "train": str(tmp_path / "pairs.csv"), "image_size": 8,
                                   "held_out_fraction": 0.34, "label_key": "label",
                                   "class_names": ["square", "circle"]})
    assert data.spec.shape == (3, 8, 8) and data.spec.num_classes == 2
    assert len(data.train["image"]) == 4 and len(data.held_out["image"]) == 2
    assert data.train["image"].min() >= -1 and data.train["image"].max() <= 1
    batch = next(data.train_batches(2, seed=0))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["text"].dtype == torch.long and batch["label"].shape == (2,)
    train_captions = data.tokenizer.decode(data.train["text"])
    assert set(train_captions) < set(captions)  # the vocabulary is that of the training captions
    held = data.tokenizer.decode(data.held_out["text"])
    assert all(c in captions or "<unk>" in c for c in held)
    jsonl = registry.build("data", {"plugin": "clip_pairs", "train": str(tmp_path / "pairs.jsonl"),
                                    "held_out": str(tmp_path / "pairs.jsonl"), "image_size": 4, "channels": 1})
    assert jsonl.train["image"].shape == (6, 1, 4, 4) and "label" not in jsonl.train
    rows = read_pairs(tmp_path / "pairs.csv", label_key="label")
    assert rows[0]["caption"] == "a red square" and rows[1]["label"] == "circle"


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", "path,caption\nimages/im0.png,hello\n", "missing column"),
    ("bad2.csv", "filepath,caption\nimages/im0.png,hello,extra\n", "line 2"),
    ("bad.jsonl", '{"filepath": "images/im0.png", "caption": "x"}\n{not json\n', "line 2: not valid JSON"),
    ("bad2.jsonl", '{"filepath": "images/im0.png"}\n', "line 1: missing key"),
    ("bad3.jsonl", '{"filepath": "images/nope.png", "caption": "x"}\n', "image not found"),
    ("bad4.jsonl", '["images/im0.png", "x"]\n', "expected a JSON object"),
    ("empty.csv", "filepath,caption\n", "no image-caption pairs"),
    ("pairs.parquet", "", "unknown format"),
])
def test_malformed_pair_files_are_config_errors(tmp_path, name, content, message):
    _write_images(tmp_path / "images", 1)
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        registry.build("data", {"plugin": "clip_pairs", "train": str(tmp_path / name), "held_out_fraction": 0.5})
    assert name in str(info.value)


def test_unreadable_image_is_a_config_error(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "p.jsonl").write_text(json.dumps({"filepath": "broken.png", "caption": "x"}) + "\n")
    with pytest.raises(ConfigError, match="cannot read image"):
        registry.build("data", {"plugin": "clip_pairs", "train": str(tmp_path / "p.jsonl"),
                                "held_out": str(tmp_path / "p.jsonl")})


def test_offline_caption_data_sets():
    shapes = registry.build("data", {"plugin": "clip_shapes", "train_size": 40, "held_out_size": 10, "grid": 3,
                                     "image_size": 24, "classes": "shape"})
    assert shapes.spec.shape == (3, 24, 24) and shapes.spec.num_classes == 4
    captions = shapes.tokenizer.decode(shapes.train["text"])
    assert all("unk" not in c for c in captions)
    names = ["square", "circle", "triangle", "cross"]
    assert all(names[int(y)] in c for c, y in zip(captions, shapes.train["label"]))
    again = registry.build("data", {"plugin": "clip_shapes", "train_size": 40, "held_out_size": 10, "grid": 3,
                                    "image_size": 24, "classes": "shape"})
    assert torch.equal(again.train["image"], shapes.train["image"])  # deterministic
    digits = registry.build("data", {"plugin": "clip_digits", "image_size": 12})
    assert digits.spec.shape == (1, 12, 12) and digits.spec.num_classes == 10
    names = digits.spec.extra["class_names"]
    first = digits.tokenizer.decode(digits.train["text"][:20])
    assert all(names[int(y)] in c for c, y in zip(first, digits.train["label"][:20]))
    with pytest.raises(ConfigError, match="grid"):
        registry.build("data", {"plugin": "clip_shapes", "grid": 4})


def test_distill_objective_requires_a_teacher(tmp_path):
    with pytest.raises(ConfigError, match="teacher"):
        registry.build("objective", {"plugin": "tinyclip_distill"}, spec=DataSpec(shape=(3, 8, 8)))
    with pytest.raises(ConfigError, match="does not exist"):
        registry.build("objective", {"plugin": "tinyclip_distill", "teacher": str(tmp_path / "nope")},
                       spec=DataSpec(shape=(3, 8, 8)))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("[backbone]\nplugin = \"clip\"\n")
    with pytest.raises(ConfigError, match="no checkpoint"):
        registry.build("objective", {"plugin": "tinyclip_distill", "teacher": str(tmp_path / "run")},
                       spec=DataSpec(shape=(3, 8, 8)))


def test_teacher_copy_is_not_trained_by_the_objective():
    teacher = make_clip(seed=5)
    before = copy.deepcopy(teacher.state_dict())
    student = make_clip(width=16, heads=1, seed=6)
    objective = TinyCLIPDistill(DistillConfig(teacher="(in memory)"), DataSpec(shape=(3, 8, 8)), teacher=teacher)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    image, text = make_batch()
    for step in range(3):
        loss, _ = objective.loss({"model": student}, {"image": image, "text": text}, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- several processes
def _gather_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        image = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
        text = F.normalize(torch.randn(8, 5, generator=g), dim=-1)
        rows = slice(rank * 4, (rank + 1) * 4)
        local_image, local_text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss = contrastive_loss(local_image, local_text, 10.0)
        loss.backward()
        torch.save({"loss": loss.detach(), "image": local_image.grad, "text": local_text.grad}, f"{out}/{rank}.pt")
        del loss, local_image, local_text  # the gather's autograd nodes hold the process group: free them first
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_gathered_local_losses_give_the_global_batch_gradients(tmp_path):
    """Two processes, each with half the batch: the mean of their losses is the global loss, and each
    process's feature gradients are the global loss's (times the number of processes, which DDP's
    gradient averaging divides out)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(8, 5, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(8, 5, generator=g), dim=-1).requires_grad_()
    loss = contrastive_loss(image, text, 10.0)
    loss.backward()
    parts = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    assert torch.allclose((parts[0]["loss"] + parts[1]["loss"]) / 2, loss.detach(), atol=1e-6)
    for r, part in enumerate(parts):
        assert torch.allclose(part["image"], 2 * image.grad[r * 4:(r + 1) * 4], atol=1e-6)
        assert torch.allclose(part["text"], 2 * text.grad[r * 4:(r + 1) * 4], atol=1e-6)
