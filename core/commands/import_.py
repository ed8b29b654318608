"""``flowforge import FAMILY CHECKPOINT --out RUN_DIR [--OPTION VALUE ...]``: a published checkpoint as a run.

``FAMILY`` names an installed component of kind ``importer`` (``flowforge plugins`` lists them).
Its options are command-line flags, written after ``CHECKPOINT``: ``--image-size 256`` (or
``--image_size 256``, the spelling of many training scripts) sets the option ``image_size``; values are
read as TOML values (``256``, ``true``, ``[32, 16, 8]``; a comma list ``32,16,8`` is a list too, and a
single value of a list option a one-element list) and otherwise as text. ``flowforge import FAMILY CKPT
--help`` lists them. The file is read as data only; see `core.importing` for what is written.
"""

from __future__ import annotations

import argparse
import tomllib
from typing import Any

NAME = "import"
HELP = "turn a published checkpoint into a run directory that sample / eval read (importers: flowforge plugins)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="the importer (a component of kind 'importer')")
    parser.add_argument("checkpoint", help="the published checkpoint (.pt / .pth, or .safetensors)")
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="--out RUN_DIR [--OPTION VALUE ...]",
                        help="the run directory to write and the importer's options (--help lists them)")


def value_of(text: str) -> Any:
    """A flag's value: a TOML value when it parses as one (``256``, ``true``, ``[1, 2]``, ``1,2``), else the text."""
    for candidate in (text, f"[{text}]" if "," in text else None, text.lower() if text in ("True", "False") else None):
        if candidate is None:
            continue
        try:
            return tomllib.loads(f"v = {candidate}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text


def option_parser(family: str) -> argparse.ArgumentParser:
    """The parser of ``--out``, ``--overwrite`` and the options of importer `family` (one flag per option)."""
    import registry
    from core.importing import KIND
    from core.options import options_table

    registry.get(KIND, family)  # ConfigError naming the installed importers
    parser = argparse.ArgumentParser(prog=f"flowforge import {family} CHECKPOINT",
                                     description=registry.get(KIND, family).doc)
    parser.add_argument("--out", required=True, help="the run directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    for name, typ, default, doc in options_table(KIND, family):
        flags = dict.fromkeys(["--" + name.replace("_", "-"), "--" + name])  # --image-size and --image_size
        parser.add_argument(*flags, dest="opt_" + name, metavar=typ.upper().replace(" ", ""),
                            help=f"{doc} (default {default})".replace("%", "%%"))
    return parser


def options_of(family: str, parsed: argparse.Namespace) -> dict[str, Any]:
    """The importer options given on the command line (`value_of` each; one value of a list option is a list)."""
    from core.importing import KIND
    from core.options import options_table

    lists = {name for name, typ, _, _ in options_table(KIND, family) if typ.startswith("list")}
    out = {}
    for key, text in vars(parsed).items():
        if key.startswith("opt_") and text is not None:
            value = value_of(text)
            out[key[4:]] = [value] if key[4:] in lists and not isinstance(value, list) else value
    return out


def main(args: argparse.Namespace) -> int:
    from core.importing import import_checkpoint

    parsed = option_parser(args.family).parse_args(args.rest)
    out = import_checkpoint(args.family, args.checkpoint, parsed.out, options_of(args.family, parsed),
                            overwrite=parsed.overwrite)
    print(f"wrote {out} (config.toml, checkpoints/step-00000000.pt, imported.json); "
          f"flowforge sample {out} draws from it")
    return 0
