"""lora_edu: every idea of the book *LoRA Internals* as small, tested PyTorch code.

One module per chapter: `linalg` (rank and the SVD), and more as chapters land.
`plot` and `widgets` are the book's figure helpers; they import matplotlib and
ipywidgets lazily, so the package itself needs only torch, numpy, safetensors
and tqdm.
"""

from lora_edu.linalg import (
    effective_rank,
    energy_captured,
    low_rank_approx,
    low_rank_storage,
    subspace_similarity,
)

__version__ = "0.1.0"

__all__ = [
    "effective_rank",
    "energy_captured",
    "low_rank_approx",
    "low_rank_storage",
    "subspace_similarity",
]
