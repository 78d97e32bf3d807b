"""DoRA: split each weight row into a length and a direction; LoRA turns the direction.

DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353) writes the adapted weight, one
output feature (one row i of the out x in weight) at a time, as a magnitude times a unit
direction:

    W'_i = m_i * V_i / ||V_i||,    V = W0 + s * B @ A,    m initialised to ||V_i|| (one per row)

so at step 0, W' = V (= W0, as B starts at zero). Only m (out numbers), A and B train. The
paper calls the norm "column-wise" (||.||_c) because it stores weights as in x out; its
columns are our rows, one per output feature. As the paper suggests (Sec. 4.3), ||V|| is
treated as a constant: it follows B @ A in the forward, but no gradient flows through it,
so autograd keeps no out x in tensor for it (`saved_bytes` measures the saving). The
forward never builds W'. Per output row, as PEFT computes `use_dora=True`:

    y = base(x) + (m/||V|| - 1) * (base(x) - bias) + (m/||V||) * s * B(A(x))

In training with dropout > 0, PEFT puts W0 @ dropout(x) in place of base(x) - bias, the
same dropped-out input as the LoRA path; we do the same, so both libraries train alike.

Zero rows: PEFT divides by ||V||, so a row with V_i = 0 (a zero base row while B is zero)
gives 0/0 = NaN. Such a row has no direction. We set m/||V|| = 0 there, as if its norm
were infinite: the row outputs its bias, merges to a zero row, and gets zero gradients.
That is the limit of m * V/||V|| at m = 0, where such a row starts, and no row whose norm
is nonzero changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.lora import LoRALinear, base_weight

__all__ = ["DoRALinear", "magnitude_scale", "dora_weight", "saved_bytes"]


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / ||V|| per row, shape (out,); 0 where the norm is 0 (a zero row has no direction)."""
    return magnitude / torch.where(norm > 0, norm, torch.inf)  # m / inf = 0, gradient 0 too


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, detach_norm: bool = True
) -> torch.Tensor:
    """The DoRA weight m * V / ||V|| per row, V = weight + delta: (out, in). The formula, built whole."""
    v = weight + delta  # (out, in)
    norm = torch.linalg.norm(v, dim=1)  # (out,)
    if detach_norm:
        norm = norm.detach()
    return magnitude_scale(magnitude, norm)[:, None] * v  # (out, in)


def saved_bytes(fn: Callable[[], object], exclude: nn.Module | None = None) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, each storage once.

    Storages of `exclude`'s parameters and buffers are left out (they exist anyway), so the
    count is the activation memory the forward adds.
    """
    owned = [] if exclude is None else [*exclude.parameters(), *exclude.buffers()]
    skip = {t.untyped_storage().data_ptr() for t in owned}
    kept: dict[int, torch.Tensor] = {}  # holding each tensor keeps its storage from being reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


class DoRALinear(LoRALinear):
    """A LoRALinear whose adapters are DoRA adapters (PEFT's `lora.Linear` with `use_dora=True`).

    Each DoRA adapter has, besides `lora_A` and `lora_B`, a trainable magnitude
    `lora_magnitude_vector[name]` of shape (out,). The first adapter is a DoRA one; more are
    added with `update_layer(..., use_dora=True)` (with `use_dora=False`, a plain LoRA one).
    Set `detach_norm = False` to let gradients flow through ||W0 + s B A|| (what the paper's
    Sec. 4.3 avoids). Arguments are LoRALinear's.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ):
        super().__init__(
            base_layer, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, adapter_name
        )
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> m, shape (out,)
        self.detach_norm = True  # Sec. 4.3: the norm is a constant for autograd
        self._merge_undo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see _merge_dora
        self._add_magnitude(adapter_name)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        """Add an adapter (not made active): a DoRA one with `use_dora=True`, as in PEFT."""
        if use_dora and self.merged:
            raise RuntimeError("a DoRA adapter's magnitude starts at ||W0||: unmerge() first")
        super().update_layer(
            adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora
        )
        if use_dora:
            self._add_magnitude(adapter_name)

    def _add_magnitude(self, name: str) -> None:
        with torch.no_grad():
            norm = self.weight_norm(name)  # (out,), ||W0 + s B A|| = ||W0|| when B = 0
        self.lora_magnitude_vector[name] = nn.Parameter(norm.clone())

    def weight_norm(self, adapter_name: str = "default") -> torch.Tensor:
        """||W0 + s B A|| per output row, (out,); without gradient unless `detach_norm` is False."""
        if self.merged:
            raise RuntimeError(
                f"DoRA adapter {adapter_name!r} needs the unmerged W0 for its norm, but "
                f"{self.merged_adapters} are merged into it: unmerge() first"
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            lora_weight = self.delta_weight(adapter_name)  # (out, in), s B A
            weight = base_weight(self.base_layer).to(lora_weight.dtype)  # (out, in), W0
            return torch.linalg.norm(weight + lora_weight, dim=1)  # (out,)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus a DoRA adapter's update (see the module docstring); LoRA for the others."""
        if name not in self.lora_magnitude_vector:
            return super().adapter_forward(name, x, result)
        dropout = self.lora_dropout[name]
        scale = magnitude_scale(self.lora_magnitude_vector[name], self.weight_norm(name))  # (out,)
        if self.training and isinstance(dropout, nn.Dropout):
            x = dropout(x)  # (..., in): the base term sees the same dropped-out input
            base = F.linear(x, base_weight(self.base_layer).to(x.dtype))  # (..., out), W0 x
        else:
            bias = getattr(self.base_layer, "bias", None)
            base = result if bias is None else result - bias  # (..., out), what came before
        lora = self.lora_B[name](self.lora_A[name](x)) * self.scaling[name]  # (..., out)
        return result + (scale - 1) * base + scale * lora  # (..., out)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W <- m/||W0 + s B A|| * (W + s B A) per row for a DoRA adapter, W + s B A for LoRA.

        Every scale is taken from the unmerged W0 first, as forward takes it; so DoRA
        adapters merge only into a layer that holds no merged adapter yet.
        """
        names = self._to_merge(adapter_names)
        weight = self._writable_weight()
        scales = {
            n: magnitude_scale(self.lora_magnitude_vector[n], self.weight_norm(n))
            for n in names
            if n in self.lora_magnitude_vector
        }  # name -> (out,)
        for name in names:
            if name in scales:
                self._merge_dora(name, weight, scales[name])
            else:
                self._merge_adapter(name, weight)
            self.merged_adapters.append(name)

    def _merge_dora(self, name: str, weight: torch.Tensor, scale: torch.Tensor) -> None:
        delta = self.delta_weight(name)  # (out, in)
        # Unmerge divides by the scale; rows it sets to 0 (zero norm, or m = 0) are kept as they were.
        self._merge_undo[name] = (scale, weight[scale == 0].clone())
        weight.copy_(scale[:, None] * (weight.to(delta.dtype) + delta))  # (out, in)

    def _unmerge_adapter(self, name: str, weight: torch.Tensor) -> None:
        if name not in self._merge_undo:
            return super()._unmerge_adapter(name, weight)
        scale, zeroed = self._merge_undo.pop(name)
        delta = self.delta_weight(name)  # (out, in)
        kept = scale != 0
        restored = weight.to(delta.dtype) / torch.where(kept, scale, 1)[:, None] - delta
        restored[~kept] = zeroed.to(restored.dtype)
        weight.copy_(restored)  # (out, in), W as it was before this adapter merged

    def _activate(self, names: list[str]) -> None:
        super()._activate(names)
        for name, magnitude in self.lora_magnitude_vector.items():
            magnitude.requires_grad_(name in names)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dora={list(self.lora_magnitude_vector)}"
