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


def glue(name: str, value, display: bool = False) -> None:
    """Store `value` under `name` for `{glue:text}` roles in the book's prose.

    A string shows exactly as given: myst-nb reads a stored value back with
    `ast.literal_eval`, so a string is stored quoted (its repr); were it stored bare,
    "4,100" would come back as the tuple (4, 100) and "9.0e-08" as 9e-08.
    """
    try:
        from myst_nb import glue as _glue
    except ImportError:  # e.g. on Colab: the prose is not built there
        return
    _glue(name, value, display=display)
