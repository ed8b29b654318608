"""Latent vs pixel-space rectified flow on the 32x32 digits, at equal steps.

    python benchmarks/latent_digits.py [--steps 3000] [--vae-steps 1500] [--vae-only] [--json]

1. Fits a small diffusers AutoencoderKL (block_out_channels (8, 16, 16), no attention: 32x32 -> 4x8x8) on the
   training split of the upsampled digits (MSE + 1e-4 KL, Adam), sets scaling_factor = 1 / std and
   shift_factor = mean of its latents (SD3's convention), and saves it to runs/digits_vae as a local
   diffusers folder (skipped when the folder exists; --retrain-vae refits).
2. Runs experiments/latent_rf_digits.toml and experiments/rf_digits32.toml for --steps steps each and
   prints the Frechet distance (32x32 digit-classifier features) of each run's samples against the
   real held-out images (the latent run's decoded metric and the pixel run's metric make the same
   comparison), and for the latent run the same distance recomputed here with other seeds and the
   distance against the VAE's reconstructions of the held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time

from _common import ROOT, emit, table

VAE_DIR = ROOT / "runs" / "digits_vae"
VAE = dict(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), latent_channels=4,
           norm_num_groups=4, layers_per_block=1, sample_size=32, mid_block_add_attention=False)


def train_vae(steps: int, folder=VAE_DIR, batch: int = 32, kl: float = 1e-4) -> dict:
    """Fit the VAE on the 32x32 training digits and save it; returns {recon_mse (held out), scale, shift}."""
    import torch
    from diffusers import AutoencoderKL

    import registry

    data = registry.build("data", {"plugin": "resized", "size": 32, "data": {"plugin": "digits"}})
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    stream = data.train_batches(batch, seed=0)
    for step in range(steps):
        x = next(stream)["x"]
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (recon - x).pow(2).mean() + kl * dist.kl().mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"vae step {step}: loss {float(loss.detach()):.4f}", flush=True)
    vae.eval()
    with torch.no_grad():
        train = torch.cat([next(data.train_batches(512, seed=1, start_step=k))["x"] for k in range(2)])
        mean = vae.encode(train).latent_dist.mean
        held = data.reference(500, torch.Generator().manual_seed(0))["x"]
        recon_mse = float((vae.decode(vae.encode(held).latent_dist.mean).sample - held).pow(2).mean())
    vae.register_to_config(scaling_factor=float(1 / mean.std()), shift_factor=float(mean.mean()))
    if folder.exists():
        shutil.rmtree(folder)
    vae.save_pretrained(str(folder))
    return {"recon_mse": recon_mse, "scale": float(1 / mean.std()), "shift": float(mean.mean())}


def decoded_fids(run_dir) -> dict[str, float]:
    """An independent check of the latent run's decoded metric, computed here: its first metric's inner
    Frechet distance (the same feature network) of the decoded samples against the real held-out 32x32
    images ("real", what the run's own metric now reports) and against the VAE's reconstructions of them
    ("reconstructions"), eval.num_samples each, guided with eval.guidance_scale, with seeds of its own."""
    import torch

    import registry
    from core.data import generator
    from core.generate import generate
    from core.runs import load_run

    run = load_run(run_dir, device="cpu")
    c, n = run.components, run.exp.eval.num_samples
    obs = c.data.observation
    metric = registry.build("metric", run.exp.metrics[0]["metric"], spec=obs.spec, data=obs)
    fake = generate(c, run.model, n, generator(0, "bench-generate"), guidance_scale=run.exp.eval.guidance_scale,
                    batch_size=500)[0]["x"]
    real = obs.reference(n, generator(0, "bench-reference"))["x"]
    with torch.no_grad():
        decoded = c.data.autoencoder.decode(fake).clamp(-1, 1)
        recon = c.data.autoencoder.decode(c.data.autoencoder.encode(real)).clamp(-1, 1)
    out = {}
    for name, reference in (("real", real), ("reconstructions", recon)):
        metric.reset()
        metric.update(reference, real=True)
        metric.update(decoded, real=False)
        out[name] = float(metric.compute())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--vae-steps", type=int, default=400)
    parser.add_argument("--vae-only", action="store_true")
    parser.add_argument("--retrain-vae", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="read finished runs instead of training again")
    parser.add_argument("--only", choices=["latent", "pixel"], help="run one of the two (default both)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="an override applied to both runs (e.g. eval.num_samples=500)")
    args = parser.parse_args()
    from core.run import run

    figures: dict = {}
    if args.only != "pixel" and (args.retrain_vae or not (VAE_DIR / "config.json").exists()):
        t0 = time.perf_counter()
        figures["vae"] = {**train_vae(args.vae_steps), "seconds": time.perf_counter() - t0}
        print("vae:", figures["vae"], flush=True)
    if args.vae_only:
        return
    rows = []
    for name, file in (("latent", "latent_rf_digits.toml"), ("pixel", "rf_digits32.toml")):
        if args.only and name != args.only:
            continue
        out = ROOT / "runs" / f"bench-{name}-digits32"
        t0 = time.perf_counter()
        overrides = [f"trainer.steps={args.steps}", f"trainer.checkpoint_every={args.steps}", *args.overrides]
        if name == "latent":  # the decoded metric's options sit one level down
            overrides = [o.replace("metrics.0.", "metrics.0.metric.") for o in overrides]
        if args.reuse and (out / "summary.json").exists():
            summary = json.loads((out / "summary.json").read_text())
        else:
            summary = run(ROOT / "experiments" / file, overrides, out=out, overwrite=True)
        seconds = summary.get("train_wall_time_s", time.perf_counter() - t0)
        m = summary["metrics"]
        check = decoded_fids(out) if name == "latent" else {}
        figures[name] = {"check": check, "metrics": m, "seconds": seconds}
        rows.append([name, args.steps, m["frechet_distance"], check.get("real", "-"), check.get("reconstructions", "-"),
                     m["energy_distance"], summary.get("floor", {}).get("frechet_distance", "-"), seconds])
        print(name, figures[name], flush=True)
    text = table(["run", "steps", "FID vs real images (run's metric)", "same, recomputed here",
                  "FID vs VAE reconstructions", "energy distance", "floor FID", "train seconds"], rows)
    emit(figures, text, args.json)


if __name__ == "__main__":
    main()
