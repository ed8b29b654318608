"""Manual weight inheritance (TinyCLIP): initialise a smaller CLIP from a larger one.

For each tower, student block ``i`` takes teacher block ``layers[i]``; by
default ``layers = [0, k, 2k, ...]`` with ``k = teacher_depth // student_depth``
(TinyCLIP's "interval_front"), or an explicit list of teacher indices.

Every tensor keeps the leading slice of each of its axes (the first
``student_width`` channels of the residual stream, of the MLP hidden layer, of
the embedding, the first context positions, ...), except the attention
projections, which are sliced per head: the fused ``qkv`` weight, viewed as
``(3, heads, head_dim, width)``, keeps ``[:, :student_heads, :student_head_dim,
:student_width]``, and the output projection, viewed as
``(width, heads, head_dim)``, keeps ``[:student_width, :student_heads,
:student_head_dim]``. So a student with fewer heads of the same size keeps the
teacher's first heads whole.

A student of the teacher's exact size inherits an exact copy. Shapes that
cannot be inherited (a different patch size, image size or channel count, a
larger student, more student heads than teacher heads) raise `ConfigError`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from registry import ConfigError

from .model import CLIP, TowerDims

_BLOCK = re.compile(r"^(visual|text)\.blocks\.(\d+)\.(.+)$")


def layer_indices(teacher_depth: int, student_depth: int, explicit: Sequence[int] | None = None,
                  tower: str = "") -> list[int]:
    """Teacher block index for each student block (see the module docstring)."""
    if explicit is not None:
        chosen = list(explicit)
        if len(chosen) != student_depth:
            raise ConfigError(f"{tower}: {len(chosen)} inherited layers {chosen} given for a student with "
                              f"{student_depth} blocks; give exactly one teacher index per student block")
        bad = [i for i in chosen if not 0 <= i < teacher_depth]
        if bad:
            raise ConfigError(f"{tower}: layer indices {bad} are outside the teacher's blocks 0..{teacher_depth - 1}")
        return chosen
    if student_depth > teacher_depth:
        raise ConfigError(f"{tower}: cannot inherit {student_depth} blocks from a teacher with {teacher_depth}")
    step = teacher_depth // max(student_depth, 1)
    return [i * step for i in range(student_depth)]


def _leading(t: Tensor, shape: torch.Size, name: str) -> Tensor:
    if t.ndim != len(shape):
        raise ConfigError(f"cannot inherit {name}: teacher tensor has shape {tuple(t.shape)}, student {tuple(shape)}")
    if any(s > q for s, q in zip(shape, t.shape)):
        raise ConfigError(f"cannot inherit {name}: the student's shape {tuple(shape)} is larger than the teacher's "
                          f"{tuple(t.shape)} along some axis (a student must be at most as wide as its teacher)")
    return t[tuple(slice(0, s) for s in shape)]


def _check_heads(tower: str, s: TowerDims, t: TowerDims) -> None:
    if s.heads > t.heads or s.head_dim > t.head_dim:
        raise ConfigError(f"{tower}: cannot inherit {s.heads} heads of size {s.head_dim} from a teacher with "
                          f"{t.heads} heads of size {t.head_dim} (keep the head size and use at most as many heads)")


def _slice(name: str, t: Tensor, shape: torch.Size, s: TowerDims | None, q: TowerDims | None) -> Tensor:
    if s is not None and q is not None and name.endswith("attn.qkv.weight"):
        v = t.view(3, q.heads, q.head_dim, q.width)[:, :s.heads, :s.head_dim]
        return _leading(v, torch.Size((3, s.heads, s.head_dim, shape[1])), name).reshape(shape)
    if s is not None and q is not None and name.endswith("attn.qkv.bias"):
        return t.view(3, q.heads, q.head_dim)[:, :s.heads, :s.head_dim].reshape(shape)
    if s is not None and q is not None and name.endswith("attn.proj.weight"):
        v = t.view(q.width, q.heads, q.head_dim)[:, :s.heads, :s.head_dim]
        return _leading(v, torch.Size((shape[0], s.heads, s.head_dim)), name).reshape(shape)
    return _leading(t, shape, name)


@torch.no_grad()
def inherited_state(student: CLIP, teacher: CLIP, vision_layers: Sequence[int] | None = None,
                    text_layers: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The student's state dict taken from the teacher (see the module docstring)."""
    sd, td = student.dims, teacher.dims
    sv, tv = sd.vision, td.vision
    if (sv.patch_size, sv.channels, sv.image_size) != (tv.patch_size, tv.channels, tv.image_size):
        raise ConfigError(
            f"cannot inherit the image tower: the student sees {sv.channels}x{sv.image_size}x{sv.image_size} images "
            f"in {sv.patch_size}-pixel patches, the teacher {tv.channels}x{tv.image_size}x{tv.image_size} in "
            f"{tv.patch_size}-pixel patches (patch size, image size and channels must match)")
    towers = {"visual": (sv, tv), "text": (sd.text, td.text)}
    for tower, (s, t) in towers.items():
        _check_heads(tower, s, t)
    indices = {"visual": layer_indices(tv.depth, sv.depth, vision_layers, "visual"),
               "text": layer_indices(td.text.depth, sd.text.depth, text_layers, "text")}
    teacher_state = teacher.state_dict()
    out = {}
    for name, target in student.state_dict().items():
        m = _BLOCK.match(name)
        s = q = None
        source = name
        if m:
            tower, index, rest = m.group(1), int(m.group(2)), m.group(3)
            source = f"{tower}.blocks.{indices[tower][index]}.{rest}"
            s, q = towers[tower]
        if source not in teacher_state:
            raise ConfigError(f"cannot inherit {name}: the teacher has no {source}")
        out[name] = _slice(name, teacher_state[source], target.shape, s, q).clone().to(target.dtype)
    return out


def inherit(student: CLIP, teacher: CLIP, vision_layers: Sequence[int] | None = None,
            text_layers: Sequence[int] | None = None) -> CLIP:
    """Load `inherited_state` into `student` (in place) and return it."""
    student.load_state_dict(inherited_state(student, teacher, vision_layers, text_layers))
    return student
