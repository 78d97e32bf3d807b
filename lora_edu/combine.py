"""Combine trained adapters into a new one, as PEFT's `add_weighted_adapter` does.

Two recipes (chapter 3; chapter 11 shows the second one's trap):

- "cat" stacks the factors, so Delta W = sum_i w_i Delta W_i exactly, at rank sum_i r_i;
- "linear" (equal ranks) sums A's and B's separately at the original rank, which adds
  cross terms B_i A_j: it is not the weighted sum of the updates.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from lora_edu.inject import lora_layers
from lora_edu.lora import LoRALinear

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "cat",
) -> None:
    """Add adapter `adapter_name` combining `adapters` with `weights`, as PEFT does.

    "cat": A = [w1 s1 A1; w2 s2 A2; ...], B = [B1 B2 ...], so Delta W = sum_i w_i Delta W_i
    exactly, at rank sum_i r_i. "linear" (equal ranks): with c_i = w_i s_i,
    A = sum_i sign(c_i) sqrt|c_i| A_i and B = sum_i sqrt|c_i| B_i, so Delta W also holds
    cross terms B_i A_j. The new adapter has lora_alpha = r (scaling 1; sqrt(r) if the first
    adapter uses rsLoRA, as in PEFT), is frozen and is not made active.
    """
    configs = getattr(model, "lora_configs", {})
    if not adapters or any(a not in configs for a in adapters) or len(weights) != len(adapters):
        raise ValueError(
            f"need one weight per known adapter, got {adapters}, {weights}; known: {list(configs)}"
        )
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if any(configs[a].use_dora for a in adapters):
        raise ValueError("add_weighted_adapter combines plain LoRA adapters only, not DoRA ones")
    if combination_type not in ("cat", "linear"):
        raise ValueError(f"combination_type must be 'cat' or 'linear', got {combination_type!r}")
    combination_type = "linear" if len(adapters) == 1 else combination_type  # as PEFT
    ranks = [configs[a].r for a in adapters]
    if combination_type == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"'linear' needs adapters of equal rank, got r = {ranks}; use 'cat'")
    new_r = sum(ranks) if combination_type == "cat" else ranks[0]
    targets = [configs[a].target_modules for a in adapters]
    if all(isinstance(t, str) for t in targets):
        union = "|".join(f"({t})" for t in targets)
    elif not any(isinstance(t, str) for t in targets):
        union = sorted(set().union(*targets))
    else:
        raise ValueError("cannot combine adapters whose target_modules mix a regex and a list")
    config = replace(configs[adapters[0]], r=new_r, lora_alpha=new_r, target_modules=union)
    for _, layer in lora_layers(model):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        A, B = (_cat if combination_type == "cat" else _combine_linear)(
            layer, present
        )  # (k, in), (out, k)
        layer.update_layer(adapter_name, new_r, new_r, config.lora_dropout, True, config.use_rslora)
        new_A, new_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        new_A.requires_grad_(False).zero_()  # frozen; rows of adapters this layer lacks stay 0
        new_B.requires_grad_(False).zero_()
        new_A[: A.shape[0]], new_B[:, : B.shape[1]] = A, B
    model.lora_configs = {**configs, adapter_name: config}


def _cat(layer: LoRALinear, present) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.cat(
        [layer.lora_A[a].weight * w * layer.scaling[a] for a, w in present]
    )  # (sum r, in)
    B = torch.cat([layer.lora_B[a].weight for a, _ in present], 1)  # (out, sum r)
    return A.detach(), B.detach()


def _combine_linear(layer: LoRALinear, present) -> tuple[torch.Tensor, torch.Tensor]:
    c = [w * layer.scaling[a] for a, w in present]
    w_A = torch.tensor([math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in c])  # sign on A only
    w_B = torch.tensor([math.sqrt(abs(v)) for v in c])
    A = torch.stack([layer.lora_A[a].weight for a, _ in present])  # (n, r, in)
    B = torch.stack([layer.lora_B[a].weight for a, _ in present])  # (n, out, r)
    A = (A * w_A.to(A).view(-1, 1, 1)).sum(0)  # (r, in)
    B = (B * w_B.to(B).view(-1, 1, 1)).sum(0)  # (out, r)
    return A.detach(), B.detach()
