"""LoRA+: give B a larger learning rate than A, eta_B = lambda * eta_A with lambda >> 1.

Hayou, Ghosh and Yu (2024, https://arxiv.org/abs/2402.12354) show that at large
width n, with B starting at zero and A random, one learning rate for both
factors cannot be efficient: learning stays stable only if eta_A shrinks with n,
and then A barely moves. Efficient feature learning needs eta_B / eta_A = Theta(n);
in practice a fixed ratio such as lambda = 16 is used. This module builds the
optimizer exactly as PEFT's `peft.optimizers.create_loraplus_optimizer` does::

    group            parameters                                   lr           weight decay
    groupA           lora_A and every other trainable matrix      lr           loraplus_weight_decay
    embedding        LoRA on an embedding layer                   lr_embedding loraplus_weight_decay
    groupB           lora_B, and trainable 1-D parameters         lr * lambda  loraplus_weight_decay
    groupB_no_decay  lora_B / 1-D parameters named "...bias..."   lr * lambda  0.0
                     or inside an nn.LayerNorm

Under Adam, a factor lambda on B's learning rate does what a factor lambda on the
LoRA scale s does (chapter 4): LoRA+ turns the same knob as alpha and rsLoRA, per
layer width instead of per rank.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["GROUPS", "loraplus_groups", "loraplus_param_groups", "create_loraplus_optimizer"]

GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")  # PEFT's order


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names that never get weight decay: "bias" in the name, or inside a LayerNorm.

    This is the rule of transformers' Trainer that PEFT reuses
    (`get_parameter_names(model, [nn.LayerNorm])`, then names containing "bias" removed).
    """
    norms = [f"{n}." for n, m in model.named_modules() if n and isinstance(m, nn.LayerNorm)]
    names = {n for n, _ in model.named_parameters()}
    return {n for n in names if "bias" in n or n.startswith(tuple(norms))}


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    """The module two levels above a parameter (a LoRA layer for `x.lora_A.default.weight`)."""
    owner = ".".join(name.split(".")[:-2])
    return model.get_submodule(owner) if owner else None


def loraplus_groups(model: nn.Module) -> dict[str, str]:
    """Which LoRA+ group each trainable parameter belongs to: {parameter name: group name}.

    A pure function of the model's names, shapes and `requires_grad` flags (nothing is
    allocated), so it can be printed before building an optimizer. Frozen parameters are
    left out. LoRA on an embedding is recognised as PEFT's `lora.Embedding` is: its layer
    holds `lora_embedding_A` (lora_edu itself adapts linear layers only).
    """
    no_decay = _no_decay_names(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if hasattr(_owner(model, name), "lora_embedding_A"):
            groups[name] = "embedding"
        elif "lora_B" in name or param.ndim == 1:
            groups[name] = "groupB_no_decay" if name in no_decay else "groupB"
        else:
            groups[name] = "groupA"
    return groups


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
) -> list[dict]:
    """The four parameter groups (some may be empty) in PEFT's order, with lr and weight decay."""
    settings = {
        "groupA": (lr, loraplus_weight_decay),
        "embedding": (loraplus_lr_embedding, loraplus_weight_decay),
        "groupB": (lr * loraplus_lr_ratio, loraplus_weight_decay),
        "groupB_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    assignment = loraplus_groups(model)
    params = dict(model.named_parameters())
    return [
        {
            "params": [params[n] for n, g in assignment.items() if g == group],
            "weight_decay": settings[group][1],
            "lr": settings[group][0],
        }
        for group in GROUPS
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs,
) -> torch.optim.Optimizer:
    """An optimizer whose groups give B a learning rate `loraplus_lr_ratio` times A's.

    Same parameter groups, learning rates and weight decays as PEFT's
    `create_loraplus_optimizer` (see the table in the module docstring).

    Weight decay, decided openly: as in PEFT, every group's weight decay is
    `loraplus_weight_decay` (0.0 for `groupB_no_decay`), so a `weight_decay=` passed for
    the optimizer is overridden in every group. Note that this also switches off AdamW's
    default decay of 0.01. We keep PEFT's behaviour, because matching PEFT is the
    contract (the same call gives the same training in both libraries), and warn when a
    `weight_decay` keyword would be ignored. PEFT's 8-bit-embedding override for
    bitsandbytes optimizers is not reproduced (lora_edu never imports bitsandbytes).

    Args:
        model: a model with LoRA adapters; only parameters that require grad are optimized.
        optimizer_cls: e.g. `torch.optim.AdamW`.
        lr: eta_A, the learning rate of A (and of every other trainable matrix).
        loraplus_lr_ratio: lambda = eta_B / eta_A (>= 1; 16 is a common choice).
        loraplus_lr_embedding: learning rate of LoRA on embedding layers.
        loraplus_weight_decay: weight decay of every group (except groupB_no_decay).
        **kwargs: passed to `optimizer_cls` (betas, eps, ...).
    """
    if not lr > 0 or not loraplus_lr_ratio > 0:
        raise ValueError(
            f"lr and loraplus_lr_ratio must be > 0, got lr={lr!r}, ratio={loraplus_lr_ratio!r}"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: add LoRA adapters first")
    if kwargs.get("weight_decay", loraplus_weight_decay) != loraplus_weight_decay:
        warnings.warn(
            f"weight_decay={kwargs['weight_decay']} is ignored, as in PEFT: every LoRA+ group "
            f"uses loraplus_weight_decay={loraplus_weight_decay}. Pass loraplus_weight_decay.",
            stacklevel=2,
        )
    groups = loraplus_param_groups(
        model, lr, loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay
    )
    return optimizer_cls(groups, lr=lr, **kwargs)
