"""LoRA layer costs: lora_edu vs PEFT, the training step vs the frozen floor, merged inference.

Each function returns rows {"benchmark", "case", "ratio", "min", "max", "target", "note"}.
PEFT is a reference here only (the package never imports it).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from benchmarks.common import paired_ratio
from lora_edu import LoRALinear


def _layers(d: int, r: int, seed: int = 0):
    """A base nn.Linear(d, d), lora_edu's LoRALinear and PEFT's LoRA layer, same weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Linear(d, d, bias=False)
    ours = LoRALinear(copy.deepcopy(base), r=r, lora_alpha=2 * r)
    with torch.no_grad():
        ours.lora_B["default"].weight.normal_(std=0.01)
    wrapper = nn.Sequential(OrderedDict(proj=copy.deepcopy(base)))
    peft_model = get_peft_model(wrapper, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    theirs = peft_model.base_model.model.proj
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A["default"].weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B["default"].weight)
    base.requires_grad_(False)
    return base, ours, theirs


def _fwd_bwd(layer, x):
    # A fixed random upstream gradient, as a real loss gives: `.sum().backward()` would
    # hand every layer a zero-stride gradient that some kernels first copy out.
    grad = torch.randn(
        x.shape[:-1] + (layer(x).shape[-1],), generator=torch.Generator().manual_seed(1)
    )

    def step():
        layer(x).backward(grad)
        x.grad = None
        for p in layer.parameters():
            p.grad = None

    return step


def lora_vs_peft(dims=(1024, 4096), ranks=(8, 64), tokens=2048, repeats=7) -> list[dict]:
    """1. LoRALinear forward + backward vs PEFT's LoRA layer with the same weights."""
    rows = []
    for d in dims:
        for r in ranks:
            _, ours, theirs = _layers(d, r)
            x = torch.randn(tokens, d, requires_grad=True)
            out_diff = (ours(x) - theirs(x)).abs().max().item()
            res = paired_ratio(_fwd_bwd(ours, x), _fwd_bwd(theirs, x), repeats=repeats)
            rows.append(
                {
                    "benchmark": "LoRALinear fwd+bwd / PEFT",
                    "case": f"d={d}, r={r}",
                    **res,
                    "target": 1.05,
                    "note": f"max output diff {out_diff:.1e}",
                }
            )
    return rows


def step_vs_floor(d=4096, r=8, tokens=2048, repeats=7) -> list[dict]:
    """2. A LoRA training step (and full fine-tuning) vs the frozen-base floor."""
    base, ours, _ = _layers(d, r)
    x = torch.randn(tokens, d, requires_grad=True)
    floor = _fwd_bwd(base, x)  # input gradient only: the floor any method pays
    flops = 1 + 6 * r * (d + d) / (4 * d * d)  # adapter fwd+bwd over base fwd + input grad
    full = copy.deepcopy(base).requires_grad_(True)
    return [
        {"benchmark": "LoRA step / frozen floor", "case": f"d={d}, r={r}",
         **paired_ratio(_fwd_bwd(ours, x), floor, repeats=repeats), "target": 1.1,
         "note": f"FLOP ratio {flops:.3f}"},
        {"benchmark": "full fine-tuning step / frozen floor", "case": f"d={d}",
         **paired_ratio(_fwd_bwd(full, x), floor, repeats=repeats), "target": None,
         "note": "FLOP ratio 1.500"},
    ]  # fmt: skip


def merged_inference(d=4096, r=8, tokens=2048, repeats=7) -> list[dict]:
    """3. Merged LoRA inference vs a plain nn.Linear, and the unmerged overhead."""
    base, ours, _ = _layers(d, r)
    x = torch.randn(tokens, d)
    plain = copy.deepcopy(base)
    with torch.no_grad():
        unmerged = paired_ratio(lambda: ours(x), lambda: plain(x), repeats=repeats)
        ours.merge()
        merged = paired_ratio(lambda: ours(x), lambda: plain(x), repeats=repeats)
    return [
        {"benchmark": "merged LoRA forward / nn.Linear", "case": f"d={d}, r={r}", **merged,
         "target": 1.05, "note": "inference, no grad"},
        {"benchmark": "unmerged LoRA forward / nn.Linear", "case": f"d={d}, r={r}", **unmerged,
         "target": None, "note": "inference, no grad"},
    ]  # fmt: skip
