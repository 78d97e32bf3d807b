"""The LoRA scaling factor s that multiplies the low-rank update: h = W0 x + s * B A x.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685, Sec. 4.1) uses
s = alpha / r, so that changing the rank r does not change how large the update
starts out; in practice alpha is tuned once and r is swept. Rank-stabilized LoRA
(Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732) shows that alpha / r
shrinks the update's learning signal as r grows, and that s = alpha / sqrt(r)
keeps it stable: the `rslora=True` branch (PEFT's `use_rslora`).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["lora_scaling"]


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The factor s in h = W0 x + s * B A x.

    Args:
        alpha: `lora_alpha`, a positive number.
        r: the rank, a positive integer.
        rslora: use rank-stabilized scaling alpha / sqrt(r) instead of alpha / r.

    Returns:
        alpha / r, or alpha / sqrt(r) when `rslora` is true.
    """
    if isinstance(r, bool) or not isinstance(r, Integral) or r <= 0:
        raise ValueError(f"r (the LoRA rank) must be a positive integer such as 8, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be a finite positive number such as 16, got {alpha!r}")
    if alpha <= 0:
        raise ValueError(f"lora_alpha must be > 0 (it sets the size of the update), got {alpha!r}")
    return float(alpha / math.sqrt(r)) if rslora else float(alpha / r)
