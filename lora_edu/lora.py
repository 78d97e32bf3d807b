"""The LoRA layer: a frozen linear layer plus a trainable low-rank update.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained
weight W0 (out x in) and learns its change as a product of two thin matrices,
A (r x in) and B (out x r), with r much smaller than in and out:

    h = W0 x + s * B (A x),    s = lora_alpha / r   (or lora_alpha / sqrt(r), rsLoRA)

B starts at zero, so training starts exactly at the pretrained model. The
forward never builds Delta W = s * B @ A: x goes down to r numbers through A and
back up through B, r * (in + out) multiply-adds per token instead of in * out.
After training, Delta W can be added into W0 (`merge`), and inference costs
nothing extra. Names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `scaling`),
so code and checkpoints carry over.

Margin note: some tutorials store A as (in x r) and B as (r x out) and write
`x @ A @ B`. That is the same update with transposed factors; here, as in PEFT,
A and B are `nn.Linear` layers whose weights are (r x in) and (out x r).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_edu.scaling import lora_scaling

__all__ = ["LoRALinear", "base_weight", "is_linear_like"]

INIT_CHOICES = (True, False, "gaussian")


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The float weight (out x in) of a base layer: `layer.dequantize()` if it has one, else `layer.weight`."""
    if callable(getattr(layer, "dequantize", None)):
        return layer.dequantize()
    return layer.weight


def is_linear_like(module: nn.Module) -> bool:
    """True for what LoRALinear can wrap: `in_features`, `out_features` and a weight or `dequantize()`."""
    sizes = [getattr(module, "in_features", None), getattr(module, "out_features", None)]
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    return all(isinstance(n, int) for n in sizes) and (
        has_weight or callable(getattr(module, "dequantize", None))
    )


def _adapter_place(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for new adapter weights: the base's device; float32 unless the base is fp32/fp64.

    As PEFT does by default (`autocast_adapter_dtype=True`), a bf16/fp16 base gets fp32 adapters.
    """
    tensors = [*layer.parameters(), *layer.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    weight = getattr(layer, "weight", None)
    wide = isinstance(weight, torch.Tensor) and weight.dtype in (torch.float32, torch.float64)
    return device, weight.dtype if wide else torch.float32


class LoRALinear(nn.Module):
    """A frozen linear-like `base_layer` plus named low-rank adapters (PEFT's `lora.Linear`).

    Args:
        base_layer: `nn.Linear`, or any module with `in_features`, `out_features` and
            a `.weight` or a `.dequantize()` (a quantized layer). Its parameters are frozen.
        r: rank of the first adapter.
        lora_alpha: its scaling is lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`).
        lora_dropout: dropout probability on the adapter's input (the base path never drops).
        init_lora_weights: True (PEFT's default: A Kaiming-uniform, B zero), "gaussian"
            (A normal with std 1/r, B zero) or False (nn.Linear's random init for both).
        use_rslora: use rank-stabilized scaling.
        adapter_name: name of the first adapter; it is the active one.

    Numerics. A float16/bfloat16 base gets float32 adapters: x goes through the base
    layer in its own dtype and through the adapter in float32; the sum is taken in
    float32 and rounded once to the base's dtype, so the output keeps the base's dtype
    and only one extra rounding. A float16 output overflows to inf where the sum
    exceeds 65504 (a huge lora_alpha can do that); `merge` refuses (OverflowError)
    an update that would overflow the base weight's dtype. Any r >= 1 is allowed,
    also r >= min(in, out): Delta W can then be any matrix, but r * (in + out)
    trainable numbers are no fewer than in * out. Any finite lora_alpha > 0 is
    allowed: with s * abs(B A x) far below abs(W0 x) (lora_alpha = 1e-8) the update
    is lost in rounding. Merge then unmerge restores W0 up to the rounding of
    W0 + Delta W (about 6e-8 times abs(Delta W) in float32), which with a huge
    lora_alpha (1e8) is percents of W0: keep such an adapter unmerged.
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
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(
                f"LoRALinear wraps a linear layer (in_features, out_features and a weight or "
                f"dequantize()), got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()  # name -> nn.Linear(in, r), weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> nn.Linear(r, out), weight (out, r)
        self.lora_dropout = nn.ModuleDict()  # name -> nn.Dropout, or nn.Identity when p == 0
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.merged_adapters: list[str] = []
        self.disable_adapters = False  # when True, forward is the base layer alone
        # The first adapter is a plain LoRA one; a subclass (DoRALinear) adds its own parts after.
        LoRALinear.update_layer(
            self, adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora
        )
        base_layer.requires_grad_(False)  # W0 stays frozen (only once the arguments are valid)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        """Add an adapter called `adapter_name`. It is not made active: see `set_adapter`."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(
                f"adapter_name must be a non-empty string without '.', got {adapter_name!r}"
            )
        if adapter_name in self.lora_A:
            raise ValueError(
                f"this layer already has an adapter named {adapter_name!r}; pick a new name"
            )
        scaling = lora_scaling(lora_alpha, r, use_rslora)  # validates r and lora_alpha
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in INIT_CHOICES:
            raise ValueError(
                f"init_lora_weights must be one of {INIT_CHOICES}, got {init_lora_weights!r}"
            )
        device, dtype = _adapter_place(self.base_layer)
        lora_A = nn.Linear(
            self.in_features, r, bias=False, device=device, dtype=dtype
        )  # weight (r, in)
        lora_B = nn.Linear(
            r, self.out_features, bias=False, device=device, dtype=dtype
        )  # weight (out, r)
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(
                lora_A.weight, a=math.sqrt(5)
            )  # nn.Linear's own init, as in PEFT
        elif init_lora_weights == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        if init_lora_weights is not False:
            nn.init.zeros_(lora_B.weight)  # Delta W = 0 at step 0
        self.lora_A[adapter_name], self.lora_B[adapter_name] = lora_A, lora_B
        self.lora_dropout[adapter_name] = (
            nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        )
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name], self.use_rslora[adapter_name] = scaling, use_rslora

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """base_layer(x) + sum over active adapters of scaling * B(A(dropout(x)))."""
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if self.disable_adapters:
            if self.merged:
                raise RuntimeError(
                    f"cannot disable adapters {self.merged_adapters}: they are merged into the "
                    "base weight. Call unmerge() first."
                )
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A or name in self.merged_adapters:
                continue  # this layer lacks the adapter, or W0 already holds it
            result = self.adapter_forward(name, x.to(self.lora_A[name].weight.dtype), result)
        return result.to(out_dtype)

    def adapter_forward(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` plus one adapter's update, scaling * B(A(dropout(x))); x in the adapter's dtype.

        B's weight enters a fused multiply-add directly, so forward hooks registered on
        `lora_B[name]` do not fire (hook `lora_A[name]` or this layer instead).
        """
        h = self.lora_A[name](self.lora_dropout[name](x))  # (..., r)
        # The same as `result + self.lora_B[name](h) * scaling`, as one fused multiply-add:
        # addmm writes one (tokens, out) tensor where that line writes three (and its
        # backward one more); those full-size passes cost a training step ~6% (benchmarks/).
        out = torch.addmm(
            result.to(h.dtype).reshape(-1, result.shape[-1]),  # (tokens, out)
            h.reshape(-1, h.shape[-1]),  # (tokens, r)
            self.lora_B[name].weight.t(),  # (r, out)
            alpha=self.scaling[name],
        )
        return out.view(*result.shape[:-1], out.shape[-1])  # (..., out)

    def delta_weight(self, adapter_name: str = "default") -> torch.Tensor:
        """Delta W = scaling * B @ A, shape (out, in), in the adapter's dtype."""
        self._check_known([adapter_name])
        weight_A = self.lora_A[adapter_name].weight  # (r, in)
        weight_B = self.lora_B[adapter_name].weight  # (out, r)
        return (weight_B @ weight_A) * self.scaling[adapter_name]  # (out, in)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None) -> None:
        """W0 <- W0 + Delta W for each adapter (default: the active ones this layer has)."""
        names = self._to_merge(adapter_names)
        weight = self._writable_weight()
        for name in names:
            self._merge_adapter(name, weight)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - Delta W for every merged adapter, newest first (a no-op when none is merged)."""
        while self.merged_adapters:
            self._unmerge_adapter(self.merged_adapters.pop(), self._writable_weight())

    def _to_merge(self, adapter_names: list[str] | None) -> list[str]:
        """The adapters `merge` will merge (default: the active ones this layer has), checked."""
        if adapter_names is None:
            adapter_names = [n for n in self.active_adapters if n in self.lora_A]
        self._check_known(adapter_names)
        if len(set(adapter_names)) != len(adapter_names):
            raise ValueError(
                f"adapter_names lists an adapter twice: {adapter_names}; name each once"
            )
        again = [n for n in adapter_names if n in self.merged_adapters]
        if again:
            raise ValueError(
                f"adapter(s) {again} are already merged into the base weight; unmerge() first"
            )
        return list(adapter_names)

    def _merge_adapter(self, name: str, weight: torch.Tensor) -> None:
        merged = weight + self.delta_weight(name).to(weight.dtype)  # (out, in)
        if not torch.isfinite(merged).all() and torch.isfinite(weight).all():
            raise OverflowError(
                f"merging adapter {name!r} overflows the base weight's {weight.dtype} (largest "
                f"finite value {torch.finfo(weight.dtype).max:g}), so it was not merged; keep it "
                "unmerged, or merge into a float32 copy of the base layer"
            )
        weight.copy_(merged)  # in place: the base layer keeps its parameter

    def _unmerge_adapter(self, name: str, weight: torch.Tensor) -> None:
        weight -= self.delta_weight(name).to(weight.dtype)  # (out, in), in place

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters the active ones: used in forward and trainable; the others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_known(names)
        self._activate(names)

    def _activate(self, names: list[str]) -> None:
        for name in self.lora_A:
            self.lora_A[name].requires_grad_(name in names)
            self.lora_B[name].requires_grad_(name in names)
        self.active_adapters = list(names)

    def _check_known(self, names: list[str]) -> None:
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {sorted(self.lora_A)}")

    def _writable_weight(self) -> torch.Tensor:
        weight = getattr(self.base_layer, "weight", None)
        quantized = callable(getattr(self.base_layer, "dequantize", None))
        if quantized or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise TypeError(
                f"cannot merge into a {type(self.base_layer).__name__} base layer: it has no writable "
                "float weight (is it quantized?). Dequantize it first, e.g. replace it by an "
                "nn.Linear holding base_weight(layer), then merge."
            )
        return weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}"
