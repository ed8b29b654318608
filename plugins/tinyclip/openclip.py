"""OpenAI CLIP, open_clip and TinyCLIP state dicts -> flowforge's `CLIP`.

A checkpoint file is read without executing code: ``.safetensors`` with
safetensors, anything else with ``torch.load(weights_only=True)`` (OpenAI's
TorchScript archives cannot be read that way: load them once with
``clip.load(..., jit=False)`` and save ``model.state_dict()``). A dict holding
``state_dict`` or ``model`` is unwrapped. Key layouts understood:

* **OpenAI / open_clip** (``CLIP`` with a ViT tower)::

      visual.conv1.weight (W, C, p, p)          -> visual.conv.weight
      visual.class_embedding (W,)               -> visual.class_embedding
      visual.positional_embedding (N + 1, W)    -> visual.positional_embedding
      visual.ln_pre.* / visual.ln_post.*        -> visual.ln_pre.* / visual.ln_post.*
      visual.proj (W, E)                        -> visual.proj.weight = proj^T  (x @ proj = Linear(x))
      token_embedding.weight (V, D)             -> text.token_embedding.weight
      positional_embedding (L, D)               -> text.positional_embedding
      ln_final.*                                -> text.ln_final.*
      text_projection (D, E)                    -> text.proj.weight = text_projection^T
      logit_scale                               -> logit_scale
      {visual.}transformer.resblocks.i.attn.in_proj_{weight,bias}  -> {visual|text}.blocks.i.attn.qkv.*
      {visual.}transformer.resblocks.i.attn.out_proj.*             -> ....blocks.i.attn.proj.*
      {visual.}transformer.resblocks.i.ln_{1,2}.*                  -> ....blocks.i.ln_{1,2}.*
      {visual.}transformer.resblocks.i.mlp.c_fc.* / mlp.c_proj.*   -> ....blocks.i.mlp.fc1.* / mlp.fc2.*

  ``in_proj_weight (3D, D)`` stacks ``[q | k | v]``, each ``heads x head_dim``
  rows: flowforge's fused ``qkv`` layout, copied as is. Positional embeddings
  are ``(positions, width)`` in both.
* **open_clip CustomTextCLIP** with its own text transformer: the text keys
  above under ``text.`` (``text.transformer.resblocks...``, ``text.token_embedding...``).
* **TinyCLIP** (microsoft/Cream): ``_image_encoder.visual.*``,
  ``_text_encoder.*`` and ``_logit_scale.logit_scale``, each optionally with
  ``module.`` after the first part; any file may also prefix every key with ``module.``.

The architecture is read from the shapes (widths, depths, MLP widths, patch
and image size, vocabulary, context length, embedding size). Heads and the
activation are not in the weights: they come from an open_clip / TinyCLIP
model config beside the file (``FILE.json``, or ``open_clip_config.json`` in
its folder, whose ``model_cfg`` is used: ``vision_cfg.head_width`` (default
64), ``text_cfg.heads`` (default 8), ``quick_gelu`` (default false)) or else
OpenAI's rule (``heads = width // 64``, QuickGELU). Text is pooled at the
largest token id (CLIP's end-of-text, ``vocab_size - 1``). Towers flowforge
does not have (ResNet, layer scale, attention pooling, biased projections,
per-block sizes left by automatic pruning) are a `ConfigError`.
Images must already be preprocessed the way the checkpoint expects.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import mismatch_detail
from registry import ConfigError

from .model import CLIP, CLIPDims, TowerDims

_SKIP = {"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask"}
_FIXED = {
    "visual.conv1.weight": "visual.conv.weight", "visual.class_embedding": "visual.class_embedding",
    "visual.positional_embedding": "visual.positional_embedding", "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias", "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias", "token_embedding.weight": "text.token_embedding.weight",
    "positional_embedding": "text.positional_embedding", "ln_final.weight": "text.ln_final.weight",
    "ln_final.bias": "text.ln_final.bias", "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual.proj.weight", "text_projection": "text.proj.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
                "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "ln_2.weight": "ln_2.weight",
                "ln_2.bias": "ln_2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
_TINYCLIP = re.compile(r"^_(image_encoder|text_encoder|logit_scale)\.(module\.)?(.+)$")


def canonical_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The OpenAI key layout of an OpenAI, open_clip (also CustomTextCLIP) or TinyCLIP state dict."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    custom_text = any(k.startswith("text.transformer.") for k in state)
    out = {}
    for key, value in state.items():
        m = _TINYCLIP.match(key)
        if m:
            key = m.group(3)  # _image_encoder.visual.x -> visual.x; _text_encoder.x -> x; _logit_scale.logit_scale
        elif custom_text and key.startswith("text."):
            key = key[len("text."):]
        if key not in _SKIP and not key.endswith("position_ids"):
            out[key] = value
    return out


def openai_to_flowforge(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and transpose the projections of) a state dict in any layout of the module docstring."""
    out: dict[str, Tensor] = {}
    for key, value in canonical_keys(state).items():
        if key in _FIXED:
            out[_FIXED[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t()
        elif (m := _BLOCK.match(key)) and m.group(3) in _BLOCK_PARTS:
            out[f"{'visual' if m.group(1) else 'text'}.blocks.{m.group(2)}.{_BLOCK_PARTS[m.group(3)]}"] = value
        else:
            raise ConfigError(f"unsupported CLIP weight {key!r}: flowforge's CLIP has a ViT image tower and a "
                              f"plain text transformer (no ResNet, layer scale, attention pooling or biased "
                              f"projections)")
    return out


def _tower_shapes(state: dict[str, Tensor], tower: str, width: int) -> tuple[int, int]:
    """``(depth, mlp_width)`` of the flowforge-named `tower`, checking every block has the same sizes."""
    fc1 = {int(k.split(".")[2]): v.shape for k, v in state.items()
           if k.startswith(f"{tower}.blocks.") and k.endswith("mlp.fc1.weight")}
    qkv = {int(k.split(".")[2]): v.shape for k, v in state.items()
           if k.startswith(f"{tower}.blocks.") and k.endswith("attn.qkv.weight")}
    if not fc1 or sorted(fc1) != list(range(len(fc1))) or sorted(qkv) != sorted(fc1):
        raise ConfigError(f"the {tower} tower's blocks are missing or incomplete")
    if len(set(fc1.values())) > 1 or set(qkv.values()) != {(3 * width, width)}:
        raise ConfigError(f"the {tower} tower's blocks differ in size (an automatically pruned model?); "
                          f"flowforge's CLIP needs one width, head count and MLP width per tower")
    return len(fc1), fc1[0][0]


def _heads(width: int, heads: int, tower: str) -> int:
    heads = heads or max(1, width // 64)
    if width % heads:
        raise ConfigError(f"the {tower} width {width} does not divide into {heads} heads")
    return heads


def dims_from_state(state: dict[str, Tensor], vision_heads: int = 0, text_heads: int = 0,
                    activation: str = "quick_gelu") -> CLIPDims:
    """The architecture of a flowforge-named state dict (`openai_to_flowforge`); heads 0: ``width // 64``."""
    need = ["visual.conv.weight", "visual.positional_embedding", "visual.proj.weight", "text.token_embedding.weight",
            "text.positional_embedding", "text.proj.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ConfigError(f"not a CLIP ViT state dict: missing {missing}")
    conv, vpos = state["visual.conv.weight"], state["visual.positional_embedding"]
    vwidth, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = round((vpos.shape[0] - 1) ** 0.5)
    if grid * grid + 1 != vpos.shape[0]:
        raise ConfigError(f"visual.positional_embedding has {vpos.shape[0]} positions, not a square grid + 1")
    vocab, twidth = state["text.token_embedding.weight"].shape
    embed = state["visual.proj.weight"].shape[0]
    if state["text.proj.weight"].shape[0] != embed:
        raise ConfigError(f"the image and text projections differ in size ({embed} vs "
                          f"{state['text.proj.weight'].shape[0]})")
    vdepth, vmlp = _tower_shapes(state, "visual", vwidth)
    tdepth, tmlp = _tower_shapes(state, "text", twidth)
    return CLIPDims(
        vision=TowerDims(vwidth, vdepth, _heads(vwidth, vision_heads, "vision"), vmlp, patch_size=patch,
                         image_size=patch * grid, channels=channels),
        text=TowerDims(twidth, tdepth, _heads(twidth, text_heads, "text"), tmlp, vocab_size=vocab,
                       context_length=state["text.positional_embedding"].shape[0]),
        embed_dim=embed, activation=activation, text_pool="argmax")


def _is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with ``code/`` or ``constants.pkl``), which
    ``torch.load`` would hand to ``torch.jit.load`` even with ``weights_only=True``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state_file(path: str | Path, key: str = "teacher") -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file or of a ``torch.load(weights_only=True)``-readable file."""
    path = Path(path)
    if _is_torchscript(path):
        raise ConfigError(f"{path} is a TorchScript archive (such as OpenAI's released .pt files), which cannot be "
                          f"read without running its code: load it once with clip.load(name, jit=False) and save "
                          f"model.state_dict() with torch.save", (key,))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means unusable weights
        raise ConfigError(f"cannot read the weights in {path}: {str(exc).splitlines()[0][:200]}", (key,)) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors", (key,))
    return obj


#: open_clip model-config keys whose non-default values describe a network flowforge's CLIP is not.
_UNSUPPORTED = {"vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                               "pool_type": "tok", "final_ln_after_pool": False, "output_tokens": False,
                               "timm_model_name": None},
                "text_cfg": {"ls_init_value": None, "hf_model_name": None, "embed_cls": False,
                             "pool_type": "argmax", "proj_bias": False, "no_causal_mask": False}}


def model_config_beside(path: Path, key: str = "teacher") -> dict[str, Any] | None:
    """The open_clip / TinyCLIP model config of checkpoint `path` (``FILE.json`` or ``open_clip_config.json``)."""
    for candidate in (path.with_suffix(".json"), path.parent / "open_clip_config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"{candidate} is not readable JSON ({exc})", (key,)) from None
            config = config.get("model_cfg", config)
            for part, defaults in _UNSUPPORTED.items():
                for name, default in defaults.items():
                    value = (config.get(part) or {}).get(name, default)
                    if value not in (default, None):
                        raise ConfigError(f"{candidate}: {part}.{name} = {value!r} is not supported by "
                                          f"flowforge's CLIP", (key,))
            return config
    return None


def load_openai_clip(path: str | Path, key: str = "teacher", vision_heads: int = 0, text_heads: int = 0,
                     activation: str | None = None) -> CLIP:
    """A flowforge `CLIP` with the weights of an OpenAI / open_clip / TinyCLIP checkpoint file.

    Heads and activation: the arguments when given, else the model config beside the file, else OpenAI's
    (module docstring).
    """
    path = Path(path)
    state = openai_to_flowforge(read_state_file(path, key))
    config = model_config_beside(path, key)
    if config is not None:
        vision, text = config.get("vision_cfg") or {}, config.get("text_cfg") or {}
        width = state["visual.conv.weight"].shape[0] if "visual.conv.weight" in state else 0
        vision_heads = vision_heads or max(1, width // int(vision.get("head_width", 64)))
        text_heads = text_heads or int(text.get("heads", 8))
        activation = activation or ("quick_gelu" if config.get("quick_gelu", False) else "gelu")
    try:
        dims = dims_from_state(state, vision_heads, text_heads, activation or "quick_gelu")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}", (key,)) from None
    model = CLIP(dims)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"the weights in {path} do not fit the CLIP their shapes describe: "
                          f"{mismatch_detail(exc)}", (key,)) from None
    return model
