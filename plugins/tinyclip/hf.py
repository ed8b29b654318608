"""Hugging Face ``transformers`` CLIP checkpoints <-> flowforge's `CLIP`, without needing transformers.

A Hugging Face CLIP directory holds ``config.json`` (a ``CLIPConfig``:
``text_config``, ``vision_config``, ``projection_dim``, ...; keys left out
take transformers' defaults) and the weights in ``model.safetensors``,
``pytorch_model.bin`` (read with ``weights_only=True``) or shards listed in
``model.safetensors.index.json``. The two architectures are the same network:

==========================================================  ===============================================
Hugging Face key                                            flowforge key
==========================================================  ===============================================
``vision_model.embeddings.patch_embedding.weight``          ``visual.conv.weight``
``vision_model.embeddings.class_embedding``                 ``visual.class_embedding``
``vision_model.embeddings.position_embedding.weight``       ``visual.positional_embedding``
``vision_model.pre_layrnorm.*`` / ``post_layernorm.*``      ``visual.ln_pre.*`` / ``visual.ln_post.*``
``visual_projection.weight``                                ``visual.proj.weight``
``text_model.embeddings.token_embedding.weight``            ``text.token_embedding.weight``
``text_model.embeddings.position_embedding.weight``         ``text.positional_embedding``
``text_model.final_layer_norm.*``                           ``text.ln_final.*``
``text_projection.weight``                                  ``text.proj.weight``
``{tower}.encoder.layers.i.self_attn.{q,k,v}_proj.*``       ``{tower}.blocks.i.attn.qkv.*`` (concatenated q, k, v)
``{tower}.encoder.layers.i.self_attn.out_proj.*``           ``{tower}.blocks.i.attn.proj.*``
``{tower}.encoder.layers.i.layer_norm{1,2}.*``              ``{tower}.blocks.i.ln_{1,2}.*``
``{tower}.encoder.layers.i.mlp.fc{1,2}.*``                  ``{tower}.blocks.i.mlp.fc{1,2}.*``
``logit_scale``                                             ``logit_scale``
==========================================================  ===============================================

Text pooling follows transformers: at the first ``eos_token_id`` of each row,
or at the largest token id for legacy configs whose ``eos_token_id`` is 2 (so
an exported model whose end-of-text id is 2 would pool differently in
transformers; flowforge's tokenizer puts it last, as CLIP's does).
Images must already be preprocessed (resized and normalised the way the
checkpoint expects); the captions must use the checkpoint's tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import mismatch_detail
from registry import ConfigError

from .model import CLIP, CLIPDims, TowerDims

#: transformers' defaults for keys a saved config.json may leave out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)

_FIXED = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "visual_projection.weight": "visual.proj.weight",
    "text_model.embeddings.token_embedding.weight": "text.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "text.positional_embedding",
    "text_model.final_layer_norm.weight": "text.ln_final.weight",
    "text_model.final_layer_norm.bias": "text.ln_final.bias",
    "text_projection.weight": "text.proj.weight",
    "logit_scale": "logit_scale",
}
_TOWERS = {"vision_model": "visual", "text_model": "text"}
_LAYER = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_RENAME = {"self_attn.out_proj": "attn.proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.fc1",
           "mlp.fc2": "mlp.fc2"}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _tower_config(config: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    given = config.get(name) or config.get(f"{name}_dict") or {}
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def dims_from_hf_config(config: dict[str, Any], where: str = "config.json") -> CLIPDims:
    """The flowforge architecture of a Hugging Face ``CLIPConfig`` (a parsed config.json)."""
    if config.get("model_type", "clip") != "clip":
        raise ConfigError(f"{where}: model_type {config.get('model_type')!r} is not a CLIP model ('clip')")
    text = _tower_config(config, "text_config", TEXT_DEFAULTS)
    vision = _tower_config(config, "vision_config", VISION_DEFAULTS)
    for part, cfg in (("text_config", text), ("vision_config", vision)):
        if cfg["hidden_act"] not in _ACTIVATIONS:
            raise ConfigError(f"{where}: {part}.hidden_act {cfg['hidden_act']!r} is not supported "
                              f"(supported: {', '.join(_ACTIVATIONS)})")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ConfigError(f"{where}: {part}.hidden_size must divide by num_attention_heads")
    if text["layer_norm_eps"] != vision["layer_norm_eps"] or text["hidden_act"] != vision["hidden_act"]:
        raise ConfigError(f"{where}: towers with different activations or layer-norm eps are not supported")
    image_size, patch_size = vision["image_size"], vision["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ConfigError(f"{where}: only square images and patches (integers) are supported")
    eos = text["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    return CLIPDims(
        vision=TowerDims(vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
                         vision["intermediate_size"], patch_size=patch_size, image_size=image_size,
                         channels=vision["num_channels"]),
        text=TowerDims(text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
                       text["intermediate_size"], vocab_size=text["vocab_size"],
                       context_length=text["max_position_embeddings"]),
        embed_dim=config.get("projection_dim", TOP_DEFAULTS["projection_dim"]),
        activation=_ACTIVATIONS[text["hidden_act"]],
        text_pool="argmax" if eos == 2 else "eot", eot_token=int(eos), layer_norm_eps=float(text["layer_norm_eps"]))


def hf_config_from_dims(dims: CLIPDims, logit_scale: float) -> dict[str, Any]:
    """A complete Hugging Face ``CLIPConfig`` dict for a flowforge model of `dims`."""
    v, t = dims.vision, dims.text
    if v.heads * v.head_dim != v.width or t.heads * t.head_dim != t.width:
        raise ConfigError("a CLIP whose attention is narrower than its width (heads x head_dim != width, as "
                          "after pruning) has no Hugging Face CLIPConfig")
    common = dict(hidden_act=dims.activation, layer_norm_eps=dims.layer_norm_eps, projection_dim=dims.embed_dim)
    return {
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": dims.embed_dim,
        "logit_scale_init_value": logit_scale,
        "text_config": dict(common, vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                            num_hidden_layers=t.depth, num_attention_heads=t.heads,
                            max_position_embeddings=t.context_length, eos_token_id=dims.eot,
                            bos_token_id=max(0, dims.eot - 1), pad_token_id=0, model_type="clip_text_model"),
        "vision_config": dict(common, hidden_size=v.width, intermediate_size=v.mlp_width, num_hidden_layers=v.depth,
                              num_attention_heads=v.heads, num_channels=v.channels, image_size=v.image_size,
                              patch_size=v.patch_size, model_type="clip_vision_model"),
    }


def hf_to_flowforge(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and fuse q, k, v of) a Hugging Face CLIP state dict into flowforge's layout."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _FIXED:
            out[_FIXED[key]] = value
            continue
        m = _LAYER.match(key)
        if not m:
            raise ConfigError(f"unexpected Hugging Face CLIP weight {key!r}")
        tower, index, rest = _TOWERS[m.group(1)], m.group(2), m.group(3)
        q = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if q:
            qkv.setdefault((f"{tower}.blocks.{index}.attn.qkv.{q.group(2)}", q.group(2)), {})[q.group(1)] = value
            continue
        module, _, param = rest.rpartition(".")
        if module not in _RENAME:
            raise ConfigError(f"unexpected Hugging Face CLIP weight {key!r}")
        out[f"{tower}.blocks.{index}.{_RENAME[module]}.{param}"] = value
    for (name, _), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConfigError(f"incomplete attention projections for {name}: found only {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def flowforge_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `hf_to_flowforge` (splits the fused qkv)."""
    inverse = {v: k for k, v in _FIXED.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    renames = {v: k for k, v in _RENAME.items()}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        m = re.match(r"^(visual|text)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise ValueError(f"unexpected flowforge CLIP key {key!r}")
        prefix = f"{towers[m.group(1)]}.encoder.layers.{m.group(2)}"
        module, param = m.group(3), m.group(4)
        if module == "attn.qkv":
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{prefix}.self_attn.{name}_proj.{param}"] = part.contiguous()
        else:
            out[f"{prefix}.{renames[module]}.{param}"] = value
    return out


def read_hf_state(directory: Path, key: str = "teacher") -> dict[str, Tensor]:
    """The raw weights of a Hugging Face directory (safetensors, sharded safetensors or a .bin file)."""
    from safetensors.torch import load_file

    single, index, legacy = directory / "model.safetensors", directory / "model.safetensors.index.json", \
        directory / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(load_file(str(directory / shard)))
            return state
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unusable weights
        raise ConfigError(f"cannot read the weights in {directory}: {str(exc).splitlines()[0][:200]}", (key,)) from None
    raise ConfigError(f"{directory} has a config.json but no model.safetensors, model.safetensors.index.json or "
                      f"pytorch_model.bin", (key,))


def load_hf_clip(directory: str | Path, key: str = "teacher") -> CLIP:
    """A flowforge `CLIP` with the weights of a Hugging Face CLIP directory."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{directory / 'config.json'} is not readable JSON ({exc})", (key,)) from None
    dims = dims_from_hf_config(config, str(directory / "config.json"))
    model = CLIP(dims, float(config.get("logit_scale_init_value", TOP_DEFAULTS["logit_scale_init_value"])))
    state = hf_to_flowforge(read_hf_state(directory, key))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"the weights in {directory} do not match its config.json: "
                          f"{mismatch_detail(exc)}", (key,)) from None
    return model


def save_hf_clip(model: CLIP, directory: str | Path) -> Path:
    """Write `model` as a Hugging Face CLIP directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in flowforge_to_hf(model.state_dict()).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config_from_dims(model.dims, float(model.logit_scale.detach()))
    if not math.isfinite(config["logit_scale_init_value"]):
        raise ValueError("the model's logit scale is not finite")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
