"""Zero-shot prompt templates and class-name lists, as data files (one entry a line, ``#`` comments).

Templates (one ``{}`` for the class name each):

* ``openai_imagenet`` — the 80 templates of OpenAI CLIP's ImageNet evaluation;
* ``cifar10`` — the 18 templates of its CIFAR-10 evaluation.

Class names (in label order): ``imagenet`` (the 1000 ImageNet-1k names of OpenAI CLIP's evaluation,
0 tench .. 999 toilet paper; two repeat there and here: missile, sunglasses), ``cifar10``, ``digits``
(zero .. nine), ``shapes`` (clip_shapes' shapes). Either may also be the path of a file in the same format.
"""

from __future__ import annotations

from pathlib import Path

from registry import ConfigError

HERE = Path(__file__).parent
TEMPLATES = {"openai_imagenet": HERE / "templates_openai_imagenet.txt", "cifar10": HERE / "templates_cifar10.txt"}
CLASSES = {"imagenet": HERE / "classes_imagenet.txt", "cifar10": HERE / "classes_cifar10.txt", "digits": HERE / "classes_digits.txt",
           "shapes": HERE / "classes_shapes.txt"}


def read_list(path: str | Path, key: str = "") -> list[str]:
    """The non-empty, non-comment lines of a UTF-8 text file, stripped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the list {path}: {exc}", (key,) if key else ()) from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ConfigError(f"{path} lists nothing", (key,) if key else ())
    return entries


def templates(name: str, key: str = "templates") -> list[str]:
    """A built-in template list (module docstring) or a file of templates, each with exactly one ``{}``."""
    entries = read_list(TEMPLATES.get(name, name), key)
    bad = [t for t in entries if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"each template needs exactly one '{{}}' for the class name, got {bad[0]!r}", (key,))
    return entries


def class_names(name: str, key: str = "classes") -> list[str]:
    """A built-in class-name list (module docstring) or a file of class names."""
    return read_list(CLASSES.get(name, name), key)
