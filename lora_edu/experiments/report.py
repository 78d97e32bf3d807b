"""Reporting helpers: round to significant figures and glue numbers into the prose.

`glue` forwards to `myst_nb.glue` when myst-nb is installed (building the book),
and otherwise does nothing, so notebooks also run on Colab without myst-nb.
"""

from __future__ import annotations

import math


def sig(x: float, digits: int = 3) -> float:
    """Round `x` to `digits` significant figures (stable numbers for stored outputs)."""
    x = float(x)
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


class _Text(str):
    """A string that shows without quotes (its repr is itself)."""

    def __repr__(self) -> str:
        return str(self)


def glue(name: str, value, display: bool = False) -> None:
    """Store `value` under `name` for `{glue:text}` roles in the book's prose (strings unquoted)."""
    try:
        from myst_nb import glue as _glue
    except ImportError:  # e.g. on Colab: the prose is not built there
        return
    _glue(name, _Text(value) if isinstance(value, str) else value, display=display)
