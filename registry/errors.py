"""Error types shared by the registry, the runner and every plugin.

`ConfigError` is the one exception a user ever sees: the runner prints its
message and exits with status 2, never a traceback. Raise it for anything the
user can fix in their experiment file or on their disk (a bad key, an unknown
plugin, a missing data path, a corrupt checkpoint).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate nearest to `word` by edit similarity, or None if none is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean "x"?)' when a close candidate exists, else ''."""
    match = closest(word, candidates)
    return f' (did you mean "{match}"?)' if match else ""


def format_path(path: Sequence[str]) -> str:
    """("trainer", "lr") -> "trainer.lr"; list indices attach without a dot: "metrics[0].plugin"."""
    text = ""
    for part in path:
        text += part if (not text or part.startswith("[")) else "." + part
    return text


class ConfigError(Exception):
    """A problem the user can fix: bad configuration, bad input data, bad files.

    Attributes:
        message: what is wrong, what was expected, and a suggestion.
        path: key path inside the experiment, e.g. ("trainer", "lr").
        file: the experiment file, when known.
    """

    def __init__(self, message: str, path: Sequence[str] = (), file: str | None = None):
        self.message = message
        self.path = tuple(str(p) for p in path)
        self.file = file
        super().__init__(str(self))

    def within(self, *prefix: str, file: str | None = None) -> "ConfigError":
        """The same error, located under `prefix` (and in `file`)."""
        return ConfigError(self.message, (*prefix, *self.path), file or self.file)

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.path:
            where.append(format_path(self.path))
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class PluginError(ConfigError):
    """A plugin could not be loaded or registered (import failure, duplicate name, API mismatch)."""
