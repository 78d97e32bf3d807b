"""QLoRA: LoRA adapters on a frozen 4-bit base (memory accounting: `lora_edu.memory`).

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) stores the frozen
linear layers of a pretrained model in NF4 (chapter 8) and trains LoRA adapters
(chapter 2) beside them; the forward pass dequantizes each weight on the fly:

    h = deq(Q(W0)) x + s * B (A x)

Gradients flow *through* the 4-bit layers to the adapters; W0 has no gradient and
no optimizer state. Training memory is weights + adapters + gradients + optimizer
states + activations, and `estimate_memory` counts each for LLaMA shapes. The
adapter learns on top of Q(W0), not W0, which has two consequences: the
quantization error sets a floor that a rank-r adapter can only partly remove
(LoftQ, Li et al., 2023, https://arxiv.org/abs/2310.08659, starts the adapter at
the best rank-r correction instead), and an adapter must be merged into
deq(Q(W0)) in high precision (`dequantize_and_merge`), not into a re-quantized
weight.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_edu.dora import dora_weight
from lora_edu.inject import _is_target, _replace, lora_layers
from lora_edu.lora import base_weight

# The memory estimator lives in lora_edu.memory; its names are importable from here too,
# as chapter 9 uses them (qlora.estimate_memory, ...).
from lora_edu.memory import (  # noqa: F401
    GB,
    LLAMA_SHAPES,
    METHODS,
    MemoryEstimate,
    Method,
    ModelShape,
    estimate_memory,
    llama_activation_bytes,
    print_memory_table,
    quantized_nbytes,
)
from lora_edu.quant import Linear4bit, dequantize_4bit, quantize_4bit

__all__ = ["prepare_qlora", "loftq", "loftq_init", "dequantize_and_merge"]


def _quantizable(model: nn.Module, skip) -> dict[str, nn.Linear]:
    """The nn.Linear layers prepare_qlora replaces: all but `skip` names and the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {
        n: m
        for n, m in model.named_modules()
        if type(m) is nn.Linear and m is not head and not _is_target(n, skip)
    }


def prepare_qlora(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = ("lm_head",),
    keep_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Quantize a model's linear layers to 4 bits and freeze everything, in place; returns it.

    Every `nn.Linear` becomes a `Linear4bit` except those named in `skip` (an exact
    name or a "."-suffix) and the output head (`get_output_embeddings()`). The head
    stays unquantized, as transformers does by default: its errors land directly on
    the logits with no later layer to absorb them, it is often tied to the input
    embedding (a lookup table, not a matmul), and it is a small share of a large
    model (1.9 % of LLaMA-7B), so quantizing it saves little.
    Then `add_lora(model, LoRAConfig(...))` puts adapters on the 4-bit layers.

    Args:
        quant_type, blocksize, double_quant: the 4-bit format (see `quant.quantize_4bit`).
        compute_dtype: dtype the 4-bit layers dequantize to in the forward pass.
        skip: names of linear layers to leave in their float format.
        keep_dtype: float16/bfloat16 parameters that stay unquantized (norms,
            embeddings, head) are cast to it, as PEFT's `prepare_model_for_kbit_training`
            does; None leaves them as they are.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers: call prepare_qlora before add_lora")
    for name, linear in _quantizable(model, skip).items():
        q = Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        _replace(model, name, q)
    if keep_dtype is not None:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(keep_dtype)
    return model.requires_grad_(False)


# --- LoftQ and merging ---------------------------------------------------------------


@torch.no_grad()
def loftq(
    weight: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    num_iter: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
):
    """LoftQ: a 4-bit Q and a rank-r pair (A, B) with Q + scaling * B @ A close to `weight`.

    Alternates `num_iter` times (B A = 0 at first, so one iteration keeps Q = Q(W)):

        Q <- quantize(W - s B A);   B, A <- best rank-r approximation of (W - Q) / s

    splitting the singular values evenly: B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T.

    Returns:
        (packed, state, A, B): the 4-bit codes and `QuantState` of Q, A (r, in), B (out, r).
    """
    w = weight.detach().float()  # (out, in)
    lora_A, lora_B = w.new_zeros(r, w.shape[1]), w.new_zeros(w.shape[0], r)
    for _ in range(num_iter):
        target = w - scaling * lora_B @ lora_A  # (out, in)
        packed, state = quantize_4bit(target, quant_type, blocksize, double_quant)
        error = w - dequantize_4bit(packed, state).float()  # (out, in)
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = (s[:r] / scaling).sqrt()  # (r,)
        lora_B, lora_A = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
    return packed, state, lora_A, lora_B


@torch.no_grad()
def loftq_init(
    model: nn.Module, reference: nn.Module, num_iter: int = 1, adapter_name: str = "default"
) -> nn.Module:
    """Give every LoRA layer on a 4-bit base LoftQ's start, in place; returns the model.

    `reference` is the float model the 4-bit one was made from (same module names);
    each 4-bit base is rebuilt from `loftq(W, ...)` in its own format, and the
    adapter `adapter_name` gets its A and B.
    """
    for name, layer in lora_layers(model):
        base = layer.base_layer
        if not isinstance(base, Linear4bit) or adapter_name not in layer.lora_A:
            continue
        w = reference.get_submodule(name).weight  # (out, in), float
        dq = base.absmax2 is not None
        packed, state, a, b = loftq(
            w, layer.r[adapter_name], layer.scaling[adapter_name], num_iter,
            base.quant_type, base.blocksize, dq,
        )  # fmt: skip
        layer.base_layer = Linear4bit(packed, state, base.bias, base.compute_dtype)
        layer.base_layer.requires_grad_(False)
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
    return model


@torch.no_grad()
def dequantize_and_merge(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge LoRA into a quantized base the right way, in place; returns the model.

    Every LoRALinear becomes an `nn.Linear` holding deq(Q(W0)) + Delta W (its active
    adapters) in `dtype`: the weight the adapter was trained against, with no
    re-quantization. (Re-quantizing the sum, e.g. with `prepare_qlora`, rounds it
    to the 4-bit grid again and changes the outputs.)
    """
    for name, layer in lora_layers(model):
        weight = base_weight(layer.base_layer).float()  # (out, in), dequantized if 4-bit
        magnitudes = getattr(layer, "lora_magnitude_vector", {})  # DoRA adapters have one
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A and adapter not in layer.merged_adapters:
                delta = layer.delta_weight(adapter).float()
                if adapter in magnitudes:  # DoRA: m * (W + dW) / ||W + dW|| per row
                    weight = dora_weight(weight, delta, magnitudes[adapter].detach().float())
                else:
                    weight = weight + delta
        bias = getattr(layer.base_layer, "bias", None)
        linear = nn.Linear(layer.in_features, layer.out_features, bias is not None, dtype=dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        _replace(model, name, linear.requires_grad_(False).to(weight.device))
    vars(model).pop("lora_configs", None)
    return model
