"""A flowforge DiT as a diffusers ``DiTTransformer2DModel`` folder (``flowforge export RUN --diffusers OUT``).

The keys follow diffusers' own DiT conversion (scripts/convert_dit_to_diffusers.py)::

    x_embedder.proj                    -> pos_embed.proj
    t_embedder.mlp.0 / .2              -> transformer_blocks.<i>.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table         -> transformer_blocks.<i>.norm1.emb.class_embedder.embedding_table
                                          (both copied into every block, as diffusers holds them)
    blocks.<i>.adaLN_modulation.1      -> transformer_blocks.<i>.norm1.linear
    blocks.<i>.attn.qkv  (rows q|k|v)  -> transformer_blocks.<i>.attn1.to_q / to_k / to_v
    blocks.<i>.attn.proj               -> transformer_blocks.<i>.attn1.to_out.0
    blocks.<i>.mlp.fc1 / fc2           -> transformer_blocks.<i>.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1     -> proj_out_1
    final_layer.linear                 -> proj_out_2
    pos_embed                          -> (dropped: diffusers recomputes the same sin-cos table)

with ``norm_eps = 1e-6`` (DiT's LayerNorms; diffusers' converter keeps its default 1e-5). diffusers'
model takes the integer step ``k`` as ``timestep``, so only a DiT with ``time_input = "integer_step"``
(an imported or a ddpm-trained one) exports. One difference is diffusers' own: its DiT embeds ``k`` with
frequencies ``10000^(-i / (half - 1))`` (``Timesteps(downscale_freq_shift=1)``), DiT's models.py with
``10000^(-i / half)``; at ``k = 0`` the two agree exactly, elsewhere the outputs differ slightly (the
docs give the measured size; tests/plugins/dit/test_diffusers_export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from registry import ConfigError


def diffusers_config(model: nn.Module) -> dict[str, Any]:
    """``DiTTransformer2DModel`` arguments of a flowforge `DiT`; ConfigError when diffusers has no such model."""
    cfg, spec = model.config, model.spec
    problems = [why for bad, why in (
        (spec.kind != "continuous" or len(spec.shape) != 3, "continuous (C, H, W) data"),
        (len(spec.shape) == 3 and spec.shape[1] != spec.shape[2], "square images (diffusers' sample_size)"),
        (spec.num_classes < 1, "class labels (diffusers' ada_norm_zero embeds a class)"),
        (cfg.mlp_ratio != 4.0, "mlp_ratio 4"), (cfg.frequency_embedding_size != 256, "256 frequencies"),
        (cfg.qk_norm, "no qk_norm"),
        (cfg.time_input != "integer_step", "time_input = \"integer_step\" (diffusers feeds the integer step)"),
    ) if bad]
    if problems:
        raise ConfigError("diffusers' DiTTransformer2DModel needs " + "; ".join(problems))
    return {"num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": model.in_channels, "out_channels": model.out_channels, "num_layers": cfg.depth,
            "sample_size": int(spec.shape[1]), "patch_size": cfg.patch_size, "num_embeds_ada_norm": spec.num_classes,
            "norm_eps": 1e-6}


def diffusers_state_dict(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """flowforge's (= DiT's) DiT state dict in diffusers' names (the table in the module docstring)."""
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(depth):
        new, old = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = new + "norm1.emb."
        for part in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{part}"] = sd[f"t_embedder.mlp.0.{part}"]
            out[f"{emb}timestep_embedder.linear_2.{part}"] = sd[f"t_embedder.mlp.2.{part}"]
            out[f"{new}norm1.linear.{part}"] = sd[f"{old}adaLN_modulation.1.{part}"]
            for name, chunk in zip(("to_q", "to_k", "to_v"), sd[f"{old}attn.qkv.{part}"].chunk(3, dim=0)):
                out[f"{new}attn1.{name}.{part}"] = chunk
            out[f"{new}attn1.to_out.0.{part}"] = sd[f"{old}attn.proj.{part}"]
            out[f"{new}ff.net.0.proj.{part}"] = sd[f"{old}mlp.fc1.{part}"]
            out[f"{new}ff.net.2.{part}"] = sd[f"{old}mlp.fc2.{part}"]
        out[f"{emb}class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}


def make_dit():
    """diffusers exporter factory: ``exporter(model, folder)`` writes ``folder`` with diffusers' save_pretrained
    (config.json + diffusion_pytorch_model.safetensors) after loading the weights strictly."""

    def exporter(model: nn.Module, folder: Path) -> Path:
        from diffusers import DiTTransformer2DModel

        config = diffusers_config(model)
        target = DiTTransformer2DModel(**config)
        target.load_state_dict(diffusers_state_dict(model.state_dict(), model.config.depth), strict=True)
        target.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    return exporter
