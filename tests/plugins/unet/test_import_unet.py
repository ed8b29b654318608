"""``flowforge import adm`` and ``flowforge import flow_matching``: UNet checkpoints in guided-diffusion's
and Meta flow_matching's own layouts become runs whose network is theirs.

The "published" checkpoints are written here from the reference UNet
(`benchmarks.reference_backbones.RefUNet`: guided-diffusion's ``UNetModel`` names, explicit attention),
every parameter drawn. guided-diffusion's legacy attention order (``QKVAttentionLegacy``, the 128x128 and
256x256 models) is written below from its equations: the 3C qkv channels are read per head as
``[q | k | v]``. A guided-diffusion table ``label_emb`` has ``num_classes`` rows. Meta's checkpoints
wrap the UNet in their EMA module: ``model.*`` tensors, ``num_updates`` and ``shadow_params.<i>`` (the
EMA of the i-th trainable parameter), with the training ``args`` as an ``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import math
import types

import pytest
import torch

import registry
from ...reference.backbones import RefUNet, _RefAttnBlock
from core import cli
from core.runs import load_run
from plugins.unet import importer

CLASSES = 10
#: guided-diffusion flags of a small class-conditional 16x16 ADM (attention at 16 and 8 pixels)
ADM_FLAGS = ["--image-size", "16", "--num-channels", "32", "--channel-mult", "1,2", "--num-res-blocks", "1",
             "--attention_resolutions", "16,8", "--num-heads", "2", "--resblock-updown", "True",
             "--class_cond", "True", "--learn-sigma", "true", "--noise-schedule", "cosine", "--use_fp16", "True"]


def legacy_attention(block: _RefAttnBlock, x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy: per head [q | k | v], q and k scaled by c^(-1/4)."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(x))
    ch = c // block.heads
    q, k, v = qkv.reshape(b * block.heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (x + block.proj_out(a)).reshape(b, c, hh, ww)


def random_unet(seed: int, legacy: bool = False, **options) -> RefUNet:
    torch.manual_seed(seed)
    ref = RefUNet(3, time_scale=1.0, **options).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5 / max(1, p[0].numel()) ** 0.5)
    if legacy:
        for m in ref.modules():
            if isinstance(m, _RefAttnBlock):
                m.forward = types.MethodType(legacy_attention, m)
    return ref


ADM_ARCH = dict(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                num_heads=2, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True, num_classes=CLASSES)


@pytest.mark.parametrize("order", ["legacy", "new", "legacy-head-channels"])
def test_an_adm_state_dict_imports_to_guided_diffusions_network(tmp_path, order):
    heads = {"num_head_channels": 16} if order.endswith("head-channels") else {}  # 2 and 4 heads of 16
    ref = random_unet(0, legacy=order.startswith("legacy"), **ADM_ARCH, **heads)
    sd = ref.state_dict()
    sd["label_emb.weight"] = sd["label_emb.weight"][:CLASSES].clone()  # guided-diffusion: no null row
    torch.save(sd, tmp_path / "adm.pt")
    flags = ADM_FLAGS + (["--use-new-attention-order", "true"] if order == "new" else []) \
        + (["--num-head-channels", "16"] if heads else [])
    assert cli.main(["import", "adm", str(tmp_path / "adm.pt"), "--out", str(tmp_path / "run"), *flags]) == 0
    run = load_run(tmp_path / "run", device="cpu")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 4, 9])
    worst = 0.0
    for k in (999, 500, 0):
        ks = torch.full((3,), k)
        with torch.no_grad():
            ours, theirs = run.model(x, (1 - (ks + 1) / 1000).float(), y), ref(x, ks.float(), y)
        assert theirs.abs().max() > 0.1
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"ADM ({order} attention order): max |flowforge - guided-diffusion| = {worst:.2e}")
    assert worst < 1e-5
    path = run.exp.components["path"]
    assert (path["schedule"], path["variance"], path["prediction"]) == ("cosine", "learned_range", "epsilon")
    assert run.exp.components["solver"]["respacing"] == "250" and run.exp.eval.guidance_scale == 0.0
    assert run.exp.components["backbone"]["attention_resolutions"] == [1, 2]


def test_adm_flags_that_do_not_fit_exit_2(tmp_path, capsys):
    ref = random_unet(0, **ADM_ARCH)
    torch.save({k: v for k, v in ref.state_dict().items() if k != "label_emb.weight"}, tmp_path / "uncond.pt")
    out = tmp_path / "run"
    cases = [(ADM_FLAGS, "has no label_emb"),
             (["--image-size", "512"], "not representable"),
             (["--image-size", "64", "--num-heads-upsample", "8"], "one head count"),
             (ADM_FLAGS[:-6] + ["--class-cond", "false", "--num-channels", "64"], "do not fit the model")]
    for flags, message in cases:
        capsys.readouterr()
        assert cli.main(["import", "adm", str(tmp_path / "uncond.pt"), "--out", str(out), *flags]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


FM_TINY = {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
           "dropout": 0.1, "num_heads": 1, "num_head_channels": 32, "use_scale_shift_norm": True,
           "resblock_updown": True, "conv_resample": True, "learn_sigma": False}


def meta_checkpoint(raw: RefUNet, ema: RefUNet, **args) -> dict:
    """examples/image train.py's checkpoint of an EMA-wrapped UNet."""
    model = {f"model.{k}": v for k, v in raw.state_dict().items()}
    model["num_updates"] = torch.tensor(7)
    model.update({f"shadow_params.{i}": p.detach().clone() for i, p in enumerate(ema.parameters())})
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "lr_schedule": {}, "epoch": 3,
            "scaler": {}, "args": argparse.Namespace(**args)}


def test_a_flow_matching_checkpoint_imports_its_ema_unet(tmp_path, monkeypatch):
    monkeypatch.setitem(importer.FM_ARCHS, "imagenet", FM_TINY)  # a small stand-in for MODEL_CONFIGS["imagenet"]
    arch = dict(FM_TINY, num_classes=CLASSES)
    arch.pop("dropout")
    raw, ema = random_unet(1, **arch), random_unet(2, **arch)
    torch.save(meta_checkpoint(raw, ema, dataset="imagenet", data_path="/data/train_blurred_64/box", use_ema=True,
                               cfg_scale=0.2, ode_method="midpoint", ode_options='{"step_size": 0.01}',
                               edm_schedule=False, discrete_flow_matching=False), tmp_path / "checkpoint.pth")
    assert cli.main(["import", "flow_matching", str(tmp_path / "checkpoint.pth"), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run", device="cpu")
    assert run.components.spec.shape == (3, 64, 64)  # the notebook's rule for train_blurred_64
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    worst = 0.0
    for t, y in ((0.0, torch.tensor([1, 2])), (0.37, None), (1.0, torch.tensor([9, CLASSES]))):
        with torch.no_grad():
            ours, theirs = run.model(x, torch.full((2,), t), y), ema(x, torch.full((2,), t), y)
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"flow_matching UNet (EMA shadow weights): max |flowforge - reference| = {worst:.2e}")
    assert worst < 1e-5
    c = run.exp.components
    assert c["solver"]["method"] == "midpoint" and c["solver"]["steps"] == 100 and c["path"]["plugin"] == "affine"
    assert c["scheduler"]["plugin"] == "cond_ot" and run.exp.eval.guidance_scale == pytest.approx(0.2)
    assert cli.main(["import", "flow_matching", str(tmp_path / "checkpoint.pth"), "--out", str(tmp_path / "raw"),
                     "--weights", "model", "--image-size", "16", "--ode-method", "heun2",
                     "--ode-options", '{"nfe": 10}', "--edm-schedule", "1"]) == 0
    again = load_run(tmp_path / "raw", device="cpu")
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in raw.state_dict().items())
    s = again.exp.components["solver"]
    assert (s["method"], s["steps"], s["grid"], again.components.spec.shape) == ("heun", 10, "edm", (3, 16, 16))


def test_flow_matchings_architectures_are_model_configs():
    """The UNet options the importer gives each dataset equal MODEL_CONFIGS of examples/image/models/model_configs.py."""
    meta = {"cifar10": dict(model_channels=128, num_res_blocks=4, attention_resolutions=[2], dropout=0.3,
                            channel_mult=[2, 2, 2], conv_resample=False, num_heads=1, num_head_channels=-1,
                            use_scale_shift_norm=True, resblock_updown=False),
            "imagenet": dict(model_channels=192, num_res_blocks=3, attention_resolutions=[2, 4, 8], dropout=0.1,
                             channel_mult=[1, 2, 3, 4], conv_resample=True, num_heads=4, num_head_channels=64,
                             use_scale_shift_norm=True, resblock_updown=True)}
    for dataset, want in meta.items():
        got = registry.resolved("backbone", {"plugin": "unet", **importer.FM_ARCHS[dataset]})
        assert {k: got[k] for k in want} == want and got["learn_sigma"] is False, dataset  # out_channels = 3


def test_a_discrete_or_foreign_flow_matching_file_exits_2(tmp_path, capsys):
    arch = dict(FM_TINY)
    arch.pop("dropout")
    ref = random_unet(0, **arch)
    torch.save(meta_checkpoint(ref, ref, dataset="cifar10", discrete_flow_matching=True), tmp_path / "d.pth")
    torch.save({"model": {"weight": torch.zeros(3)}, "args": argparse.Namespace(dataset="cifar10")}, tmp_path / "f.pth")
    for name, message in (("d.pth", "discrete flow matching"), ("f.pth", "not a UNet state dict")):
        capsys.readouterr()
        assert cli.main(["import", "flow_matching", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "run").exists()
