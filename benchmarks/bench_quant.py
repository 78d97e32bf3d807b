"""4-bit costs: lora_edu's pure-torch quantization vs bitsandbytes on the CPU, Linear4bit."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import paired_ratio
from lora_edu.quant import Linear4bit, dequantize_4bit, quantize_4bit


def quantize_vs_bnb(d=4096, repeats=5) -> list[dict]:
    """4. quantize_4bit / dequantize_4bit vs bitsandbytes for a d x d weight (nf4, blocksize 64)."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(d, d)
    packed, state = quantize_4bit(w, quant_type="nf4", blocksize=64)
    theirs, their_state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    same = torch.equal(packed.flatten(), theirs.flatten())
    q = paired_ratio(
        lambda: quantize_4bit(w, quant_type="nf4", blocksize=64),
        lambda: bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64),
        repeats=repeats,
    )
    dq = paired_ratio(
        lambda: dequantize_4bit(packed, state),
        lambda: bnbf.dequantize_4bit(theirs, their_state),
        repeats=repeats,
    )
    return [
        {"benchmark": "quantize_4bit / bitsandbytes", "case": f"{d}x{d} nf4", **q, "target": 2.0,
         "note": f"codes identical: {same}"},
        {"benchmark": "dequantize_4bit / bitsandbytes", "case": f"{d}x{d} nf4", **dq,
         "target": 2.0, "note": "CPU"},
    ]  # fmt: skip


def linear4bit_forward(d=4096, tokens=2048, repeats=5) -> list[dict]:
    """5. Linear4bit forward vs a float nn.Linear of the same shape."""
    torch.manual_seed(0)
    linear = nn.Linear(d, d, bias=False)
    q = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64)
    x = torch.randn(tokens, d)
    with torch.no_grad():
        res = paired_ratio(lambda: q(x), lambda: linear(x), repeats=repeats)
    return [{"benchmark": "Linear4bit forward / nn.Linear", "case": f"d={d}, {tokens} tokens",
             **res, "target": None, "note": "dequantizes on every call"}]  # fmt: skip
