"""Templates for ``flowforge new-plugin`` (package data: ``*.txt`` and ``*.md`` files beside this module).

Placeholders are written ``{{name}}``; `render` fills them and refuses to leave
any unfilled.
"""

from __future__ import annotations

import re
from importlib import resources

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def read(name: str) -> str:
    """The text of template file `name`."""
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def render(text: str, **values: str) -> str:
    """`text` with every ``{{key}}`` replaced by ``values[key]``; KeyError names a missing value."""
    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return str(values[key])

    return _PLACEHOLDER.sub(fill, text)
