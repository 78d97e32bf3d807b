"""lora_edu: every idea of the book *LoRA Internals* as small, tested PyTorch code.

One module per chapter: `linalg` (rank and the SVD), `lora` (the LoRA layer),
`inject`, `combine` and `adapters` (LoRA inside a model, combining adapters, PEFT's
file format), `scaling` (alpha / r and rsLoRA), `loraplus`, `dora` (DoRA), `quant`
(absmax to NF4, double quantization, Linear4bit), `qlora` and `memory` (QLoRA and
what training costs).
`plot` and `widgets` are the book's figure helpers; they import matplotlib and
ipywidgets lazily, so the package itself needs only torch, numpy, safetensors
and tqdm.
"""

from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.combine import add_weighted_adapter
from lora_edu.dora import DoRALinear
from lora_edu.inject import (
    LoRAConfig,
    add_lora,
    count_parameters,
    disable_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)
from lora_edu.linalg import (
    effective_rank,
    energy_captured,
    low_rank_approx,
    low_rank_storage,
    subspace_similarity,
)
from lora_edu.lora import LoRALinear, base_weight
from lora_edu.scaling import lora_scaling

__version__ = "0.1.0"

__all__ = [
    "DoRALinear",
    "LoRAConfig",
    "LoRALinear",
    "add_lora",
    "add_weighted_adapter",
    "base_weight",
    "count_parameters",
    "disable_adapter",
    "effective_rank",
    "energy_captured",
    "load_adapter",
    "lora_scaling",
    "low_rank_approx",
    "low_rank_storage",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "subspace_similarity",
    "unload",
]
