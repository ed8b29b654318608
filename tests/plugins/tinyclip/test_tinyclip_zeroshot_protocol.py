"""The ``zeroshot`` metric (plugins/tinyclip/zeroshot_protocol.py) against a brute-force float64 reference
written here from the protocol's definition, on 1 and 3 processes, and through ``flowforge eval``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import registry
from core.data import TensorDataSource
from core.interfaces import DataSpec
from plugins.tinyclip import prompts
from plugins.tinyclip.tokenizer import WordTokenizer
from plugins.tinyclip.zeroshot_protocol import ZeroShotProtocol, ZeroShotProtocolConfig
from registry import ConfigError

ROOT = Path(__file__).resolve().parents[3]
CLASSES = ["cat", "dog", "bird", "fish", "frog", "horse", "ship"]
TEMPLATES = ["a photo of a {}", "a {} again", "the small {}"]
ADJECTIVES = ["red", "big", "old", "wet"]


class RandomFeatures(nn.Module):
    """Fixed random linear image features and position-weighted bag-of-token text features, (B, 6)."""

    def __init__(self, vocab: int, pixels: int, length: int):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.image_map = nn.Parameter(torch.randn(pixels, 6, generator=g))
        self.token_map = nn.Parameter(torch.randn(vocab, 6, generator=g))
        self.position = nn.Parameter(torch.rand(length, generator=g) + 0.5)

    def encode_image(self, image):
        return image.flatten(1).to(self.image_map.dtype) @ self.image_map

    def encode_text(self, tokens):
        return (self.token_map[tokens] * self.position[:tokens.shape[1], None]).sum(1)


def make_data(n=37):
    g = torch.Generator().manual_seed(3)
    label = torch.randint(len(CLASSES), (n,), generator=g)
    adjective = torch.randint(len(ADJECTIVES), (n,), generator=g)  # repeated captions: 28 combinations
    captions = [f"a {ADJECTIVES[a]} {CLASSES[c]}" for a, c in zip(adjective.tolist(), label.tolist())]
    tok = WordTokenizer.from_texts(captions + [t.format(c) for t in TEMPLATES for c in CLASSES], 6)
    split = {"image": torch.randn(n, 1, 3, 3, generator=g), "text": tok.encode(captions), "label": label}
    spec = DataSpec(shape=(1, 3, 3), num_classes=len(CLASSES), vocab_size=tok.vocab_size,
                    extra={"tokenizer": tok, "class_names": CLASSES, "templates": TEMPLATES, "context_length": 6})
    return TensorDataSource(split, split, spec), RandomFeatures(tok.vocab_size, 9, 6)


@torch.no_grad()
def brute_force(model, data, n, seed=0, ks=(1, 5, 10)):
    """The protocol by loops in float64 over the rows `data.reference_slice(n, seed, 0, n)`."""
    model = model.double()
    batch = data.reference_slice(n, seed, 0, n)
    tok = data.spec.extra["tokenizer"]
    image = [F.normalize(model.encode_image(batch["image"][i:i + 1].double())[0], dim=0) for i in range(n)]
    weights = []
    for name in CLASSES:
        prompts_ = [F.normalize(model.encode_text(tok.encode([t.format(name)]))[0], dim=0) for t in TEMPLATES]
        weights.append(F.normalize(sum(prompts_) / len(prompts_), dim=0))
    out = {}
    ranks = []
    for i in range(n):
        scores = [float(image[i] @ w) for w in weights]
        ranks.append(sum(s > scores[int(batch["label"][i])] for s in scores))
    out["top1"] = sum(r < 1 for r in ranks) / n
    out["top5"] = sum(r < 5 for r in ranks) / n
    distinct = sorted({tuple(row) for row in batch["text"].tolist()})
    text = {c: F.normalize(model.encode_text(torch.tensor([c]))[0], dim=0) for c in distinct}
    own = [tuple(row) for row in batch["text"].tolist()]
    for k in ks:
        hits = 0
        for i in range(n):
            mine = float(image[i] @ text[own[i]])
            hits += sum(float(image[i] @ text[c]) > mine for c in distinct) < k
        out[f"i2t_r{k}"] = hits / n
    for k in ks:
        hits = 0
        for c in distinct:
            sims = [float(image[i] @ text[c]) for i in range(n)]
            best = max(s for s, o in zip(sims, own) if o == c)
            hits += sum(s > best for s in sims) < k
        out[f"t2i_r{k}"] = hits / len(distinct)
    model.float()
    return out


@pytest.mark.parametrize("num_examples,batch_size", [(0, 8), (20, 6), (37, 100)])
def test_matches_the_brute_force_reference(num_examples, batch_size):
    data, model = make_data()
    got = ZeroShotProtocol(ZeroShotProtocolConfig(num_examples=num_examples, batch_size=batch_size, seed=4)).evaluate(
        model, data)
    expected = brute_force(model, data, num_examples or 37, seed=4)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key  # the same counts (float32 shares)
    assert 0 < got["top1"] < 1 and got["i2t_r10"] > got["i2t_r1"]


def _sharded_worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        data, model = make_data()
        metric = ZeroShotProtocol(ZeroShotProtocolConfig(num_examples=12, batch_size=16, seed=4))
        (Path(out) / f"{rank}.json").write_text(json.dumps(metric.evaluate(model, data)))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_numbers(tmp_path):
    """12 pairs in one block of 16 (the second process embeds no image) and 21 prompts in two blocks
    (one each) over 2 processes: every process gets the one-process result."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    data, model = make_data()
    single = ZeroShotProtocol(ZeroShotProtocolConfig(num_examples=12, batch_size=16, seed=4)).evaluate(model, data)
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == pytest.approx(single, abs=1e-7)


def test_builtin_prompt_lists_and_bad_lists(tmp_path):
    imagenet = prompts.templates("openai_imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert imagenet[0] == "a bad photo of a {}." and imagenet[-1] == "a tattoo of the {}."
    assert len(prompts.templates("cifar10")) == 18
    assert prompts.class_names("cifar10")[0] == "airplane" and len(prompts.class_names("cifar10")) == 10
    assert prompts.class_names("digits")[7] == "seven"
    (tmp_path / "bad.txt").write_text("# comment\na photo\n")
    with pytest.raises(ConfigError, match="exactly one"):
        ZeroShotProtocolConfig(templates=str(tmp_path / "bad.txt"))
    with pytest.raises(ConfigError, match="cannot read"):
        ZeroShotProtocolConfig(classes=str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError):
        ZeroShotProtocolConfig(recall_at=[0])


def test_registered_with_the_openai_templates_on_a_clip():
    data = registry.build("data", {"plugin": "clip_shapes", "train_size": 16, "held_out_size": 30,
                                   "classes": "shape"})
    metric = registry.build("metric", {"plugin": "zeroshot", "templates": "openai_imagenet", "classes": "shapes"},
                            spec=data.spec, data=data)
    model = registry.build("backbone", {"plugin": "clip", "width": 32, "depth": 1}, spec=data.spec)
    out = metric.evaluate(model, data, torch.Generator())
    assert set(out) == {"top1", "top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert out["top5"] == 1.0 and all(0 <= v <= 1 for v in out.values())  # 4 classes: top-5 is certain
    assert model.training


def test_flowforge_eval_runs_zeroshot_on_a_finished_clip_run(tmp_path, capsys):
    from core.cli import main as cli
    from core.run import run
    from core.runs import load_run

    overrides = ["trainer.steps=3", "trainer.warmup_steps=1", "trainer.log_every=1", "data.train_size=64",
                 "data.held_out_size=40", "backbone.width=32", "backbone.depth=1", "trainer.batch_size=16"]
    run(ROOT / "experiments" / "tinyclip_teacher.toml", overrides, out=tmp_path / "run")
    code = cli(["eval", str(tmp_path / "run"), "--metric", "{plugin = \"zeroshot\", batch_size = 16}",
                "--out", str(tmp_path / "eval")])
    assert code == 0
    values = json.loads((tmp_path / "eval" / "eval.json").read_text())["model_metrics"]
    loaded = load_run(tmp_path / "run", device="cpu")
    direct = ZeroShotProtocol(ZeroShotProtocolConfig(batch_size=16)).evaluate(loaded.model, loaded.components.data)
    assert values == pytest.approx({f"zeroshot/{k}": v for k, v in direct.items()})
    assert "i2t_r10" in (tmp_path / "eval" / "eval.md").read_text()
    assert cli(["eval", str(tmp_path / "run"), "--metric", "fid"]) == 2  # a sample metric cannot run here


def test_imagenet_class_names_are_openai_clips_1000():
    """The list of OpenAI CLIP's ImageNet notebook (= open_clip's IMAGENET_CLASSNAMES), spot-checked by index;
    it repeats two names (657/744 missile, 836/837 sunglasses), so 998 are distinct."""
    names = prompts.class_names("imagenet")
    assert len(names) == 1000 and len(set(names)) == 998
    assert {n for n in names if names.count(n) > 1} == {"missile", "sunglasses"}
    assert [i for i, n in enumerate(names) if n in ("missile", "sunglasses")] == [657, 744, 836, 837]
    expected = {0: "tench", 1: "goldfish", 2: "great white shark", 7: "rooster", 21: "kite (bird of prey)",
                100: "black swan", 207: "Golden Retriever", 281: "tabby cat", 409: "analog clock",
                517: "construction crane", 999: "toilet paper"}
    assert {i: names[i] for i in expected} == expected
    assert all(n == n.strip() and n for n in names)
    assert ZeroShotProtocolConfig(templates="openai_imagenet", classes="imagenet").classes == "imagenet"


class _Recording:
    """A tokenizer recording the prompts it encodes, each as its position in the stream ``(B, 1)``."""

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, texts):
        start = len(self.texts)
        self.texts.extend(texts)
        return torch.arange(start, start + len(texts))[:, None]


class _Table(nn.Module):
    """Text features: row ``i`` of a fixed random table for the ``i``-th prompt, ``(B, 5)``."""

    def __init__(self, n: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))

    def encode_text(self, tokens):
        return self.table[tokens[:, 0]]


def test_imagenet_classifier_ensembles_80_prompts_per_class():
    """1000 x 80 prompts, class-major, and w_k = normalize(mean_j normalize(e_kj)) computed in float64 here."""
    from core.collectives import Group
    from plugins.tinyclip.zeroshot_protocol import classifier

    names, templates = prompts.class_names("imagenet"), prompts.templates("openai_imagenet")
    tokenizer, model = _Recording(), _Table(80_000)
    w = classifier(model, tokenizer, names, templates, 4096, Group(), torch.device("cpu"))
    texts = tokenizer.texts
    assert len(texts) == 80_000 and w.shape == (1000, 5)
    assert texts[0] == "a bad photo of a tench." and texts[79] == "a tattoo of the tench."
    assert texts[80] == "a bad photo of a goldfish." and texts[-1] == "a tattoo of the toilet paper."
    assert texts[999 * 80 + 32] == "a photo of the toilet paper."
    e = model.table.detach()
    for k in (0, 1, 517, 999):
        rows = e[k * 80:(k + 1) * 80]
        mean = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
        assert torch.allclose(w[k].double(), mean / mean.norm(), atol=1e-6)
