"""The masked CLIP of `plugins.tinyclip.l0` and its pruning to a dense flowforge `CLIP`.

``masks`` is ``{"visual": {...}, "text": {...}}``, each tower's dict holding any of ``hidden (D,)``,
``heads (L, H)``, ``intermediate (L, M)``, ``mha (L,)``, ``ffn (L,)`` (a missing kind is all ones);
the semantics are those of the `plugins.tinyclip.l0` docstring.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from .model import CLIP, Block, TextTower, Tower, VisionTower

Masks = Mapping[str, Tensor]


def full_masks(tower: Tower, masks: Masks) -> dict[str, Tensor]:
    """`masks` with every missing kind filled with ones."""
    d = tower.dims
    ones = {"hidden": (d.width,), "heads": (d.depth, d.heads), "intermediate": (d.depth, d.mlp_width),
            "mha": (d.depth,), "ffn": (d.depth,)}
    ref = tower.blocks[0].ln_1.weight
    return {k: masks[k].to(ref) if k in masks else torch.ones(shape).to(ref) for k, shape in ones.items()}


def masked_layer_norm(ln: torch.nn.LayerNorm, x: Tensor, hidden: Tensor) -> Tensor:
    """Layer norm over the kept channels (``hidden != 0``) of ``x (..., D)``; the others are 0."""
    keep = (hidden != 0).nonzero().squeeze(1)
    normed = F.layer_norm(x.index_select(-1, keep), (len(keep),), ln.weight[keep], ln.bias[keep], ln.eps)
    return x.new_zeros(x.shape).index_copy(x.ndim - 1, keep, normed)


def masked_block(block: Block, x: Tensor, m: dict[str, Tensor], i: int) -> Tensor:
    """Block `i` of the masked tower, ``(B, N, D) -> (B, N, D)``."""
    attn, hidden = block.attn, m["hidden"]
    b, n, _ = x.shape
    y = masked_layer_norm(block.ln_1, x, hidden)
    q, k, v = attn.qkv(y).view(b, n, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    heads = F.scaled_dot_product_attention(q, k, v, is_causal=block.causal) * m["heads"][i].view(1, -1, 1, 1)
    x = x + attn.proj(heads.transpose(1, 2).reshape(b, n, -1)) * hidden * m["mha"][i]
    mlp = block.mlp
    units = mlp.act(mlp.fc1(masked_layer_norm(block.ln_2, x, hidden))) * m["intermediate"][i]
    return x + mlp.fc2(units) * hidden * m["ffn"][i]


def masked_vision(v: VisionTower, image: Tensor, m: dict[str, Tensor]) -> Tensor:
    x = v.conv(image.to(v.conv.weight.dtype)).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
    x = masked_layer_norm(v.ln_pre, x * m["hidden"], m["hidden"])
    for i, block in enumerate(v.blocks):
        x = masked_block(block, x, m, i)
    return v.proj(masked_layer_norm(v.ln_post, x[:, 0], m["hidden"]))


def masked_text(t: TextTower, tokens: Tensor, m: dict[str, Tensor]) -> Tensor:
    x = (t.token_embedding(tokens) + t.positional_embedding[:tokens.shape[1]]) * m["hidden"]
    for i, block in enumerate(t.blocks):
        x = masked_block(block, x, m, i)
    x = masked_layer_norm(t.ln_final, x, m["hidden"])
    return t.proj(x[torch.arange(x.shape[0], device=x.device), t.pool_index(tokens)])


def masked_features(model: CLIP, image: Tensor, tokens: Tensor, masks: Mapping[str, Masks]
                    ) -> tuple[Tensor, Tensor]:
    """``(image features (B, E), text features (B', E))`` of the masked model (not normalised)."""
    return (masked_vision(model.visual, image, full_masks(model.visual, masks.get("visual", {}))),
            masked_text(model.text, tokens, full_masks(model.text, masks.get("text", {}))))


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """`t` zero-padded along `dim` to `size`."""
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _kept(mask_row: Tensor, sublayer: Tensor) -> Tensor:
    """Indices of the nonzero entries of `mask_row` (none when the whole sublayer's gate is 0)."""
    return (mask_row != 0).nonzero().squeeze(1) if sublayer != 0 else mask_row.new_zeros(0, dtype=torch.long)


def _pruned_block(block: Block, m: dict[str, Tensor], i: int, idx: Tensor, heads: int, units: int
                  ) -> dict[str, Tensor]:
    """Block `i`'s dense weights: kept hidden channels `idx`, its kept heads / units padded to `heads` / `units`."""
    attn, mlp, z = block.attn, block.mlp, m["hidden"]
    h, hd, d = attn.heads, attn.head_dim, len(z)
    K, U = _kept(m["heads"][i], m["mha"][i]), _kept(m["intermediate"][i], m["ffn"][i])
    qkv = attn.qkv.weight.view(3, h, hd, d)[:, K][..., idx]
    out_w = (attn.proj.weight.view(d, h, hd) * m["heads"][i].view(1, h, 1) * (z * m["mha"][i]).view(d, 1, 1))
    fc2 = mlp.fc2.weight * m["intermediate"][i].view(1, -1) * (z * m["ffn"][i]).view(-1, 1)
    return {
        "ln_1.weight": block.ln_1.weight[idx], "ln_1.bias": block.ln_1.bias[idx],
        "attn.qkv.weight": _pad(qkv, 1, heads).reshape(3 * heads * hd, len(idx)),
        "attn.qkv.bias": _pad(attn.qkv.bias.view(3, h, hd)[:, K], 1, heads).reshape(-1),
        "attn.proj.weight": _pad(out_w[idx][:, K], 1, heads).reshape(len(idx), heads * hd),
        "attn.proj.bias": (attn.proj.bias * z * m["mha"][i])[idx],
        "ln_2.weight": block.ln_2.weight[idx], "ln_2.bias": block.ln_2.bias[idx],
        "mlp.fc1.weight": _pad(mlp.fc1.weight[U][:, idx], 0, units), "mlp.fc1.bias": _pad(mlp.fc1.bias[U], 0, units),
        "mlp.fc2.weight": _pad(fc2[idx][:, U], 1, units), "mlp.fc2.bias": (mlp.fc2.bias * z * m["ffn"][i])[idx],
    }


def _pruned_tower(tower: Tower, masks: Masks, prefix: str) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The dense blocks of a tower (as ``prefix.blocks.j.*``) and its new sizes."""
    m = full_masks(tower, masks)
    idx = (m["hidden"] != 0).nonzero().squeeze(1)
    if len(idx) == 0:
        raise ValueError(f"the {prefix} tower's hidden mask keeps no channel")
    kept = [i for i in range(tower.dims.depth) if m["mha"][i] != 0 or m["ffn"][i] != 0] or [0]
    heads = max(1, *(len(_kept(m["heads"][i], m["mha"][i])) for i in kept))
    units = max(1, *(len(_kept(m["intermediate"][i], m["ffn"][i])) for i in kept))
    state = {f"{prefix}.blocks.{j}.{k}": v for j, i in enumerate(kept)
             for k, v in _pruned_block(tower.blocks[i], m, i, idx, heads, units).items()}
    hd = tower.dims.head_dim
    sizes = dict(width=len(idx), depth=len(kept), heads=heads, mlp_width=units,
                 attn_head_dim=0 if heads * hd == len(idx) else hd)  # 0: the default width // heads
    return state, sizes


@torch.no_grad()
def prune(model: CLIP, masks: Mapping[str, Masks]) -> CLIP:
    """A dense `CLIP` whose features equal ``masked_features(model, ..., masks)`` (module docstrings)."""
    v, t = model.visual, model.text
    state, v_sizes = _pruned_tower(v, masks.get("visual", {}), "visual")
    text_state, t_sizes = _pruned_tower(t, masks.get("text", {}), "text")
    state.update(text_state)
    zv, zt = full_masks(v, masks.get("visual", {}))["hidden"], full_masks(t, masks.get("text", {}))["hidden"]
    iv, it = (zv != 0).nonzero().squeeze(1), (zt != 0).nonzero().squeeze(1)
    state.update({
        "visual.conv.weight": (v.conv.weight * zv.view(-1, 1, 1, 1))[iv],
        "visual.class_embedding": (v.class_embedding * zv)[iv],
        "visual.positional_embedding": (v.positional_embedding * zv)[:, iv],
        "visual.ln_pre.weight": v.ln_pre.weight[iv], "visual.ln_pre.bias": v.ln_pre.bias[iv],
        "visual.ln_post.weight": v.ln_post.weight[iv], "visual.ln_post.bias": v.ln_post.bias[iv],
        "visual.proj.weight": v.proj.weight[:, iv],
        "text.token_embedding.weight": (t.token_embedding.weight * zt)[:, it],
        "text.positional_embedding": (t.positional_embedding * zt)[:, it],
        "text.ln_final.weight": t.ln_final.weight[it], "text.ln_final.bias": t.ln_final.bias[it],
        "text.proj.weight": t.proj.weight[:, it], "logit_scale": model.logit_scale.detach().clone(),
    })
    dims = attrs.evolve(model.dims, vision=attrs.evolve(model.dims.vision, **v_sizes),
                        text=attrs.evolve(model.dims.text, **t_sizes))
    student = CLIP(dims).to(model.logit_scale)
    student.load_state_dict({k: x.contiguous() for k, x in state.items()})
    student.logit_scale.requires_grad_(model.logit_scale.requires_grad)
    return student


def backbone_options(model: CLIP) -> dict:
    """``[backbone]`` options of the ``clip`` plugin that rebuild `model`'s architecture (for the data it
    was built for: image size, channels, vocabulary and context come from the data)."""
    d = model.dims
    options = {"plugin": "clip", "embed_dim": d.embed_dim, "patch_size": d.vision.patch_size,
               "activation": d.activation, "text_pool": d.text_pool, "eot_token": d.eot_token}
    for prefix, tower in (("vision", d.vision), ("text", d.text)):
        options.update({f"{prefix}_width": tower.width, f"{prefix}_depth": tower.depth,
                        f"{prefix}_heads": tower.heads, f"{prefix}_head_dim": tower.attn_head_dim,
                        f"{prefix}_mlp_width": tower.mlp_width})
    return options


def save_student(model: CLIP, directory: str | Path) -> Path:
    """Write `model` as a minimal flowforge run directory (``config.toml`` with its ``[backbone]`` and
    ``checkpoints/step-0.pt``), which ``teacher`` and ``inherit_from`` accept: distillation continues
    from the pruned student with ``inherit_from = DIRECTORY`` and the same backbone options."""
    import tomli_w

    from core import checkpoint as ckpt

    directory = Path(directory)
    (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
    (directory / "config.toml").write_text(tomli_w.dumps({"backbone": backbone_options(model)}))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt.save_atomic({"step": 0, "model": state, "ema": None}, ckpt.path_for(directory / "checkpoints", 0))
    return directory
