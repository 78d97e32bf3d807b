"""What fine-tuning costs in memory: weights, adapters, gradients, optimizer, activations.

`estimate_memory` counts each part for a model's shapes (`ModelShape`, read from a
model on the meta device, so LLaMA-70B costs nothing to describe) and a `Method`
that says how many bytes each kind of number takes: full fine-tuning, LoRA,
QLoRA with or without double quantization. Chapter 9 checks it tensor by tensor
on a tiny LLaMA and then applies it to LLaMA-7B to 70B; chapter 12 adds sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from lora_edu.experiments.llama import LlamaConfig, TinyLlama
from lora_edu.inject import _is_target, lora_layers
from lora_edu.lora import LoRALinear
from lora_edu.quant import Linear4bit
from lora_edu.quant_codebooks import BLOCKSIZES_4BIT, DOUBLE_QUANT_BLOCKSIZE

__all__ = [
    "GB", "quantized_nbytes", "ModelShape", "Method", "METHODS", "MemoryEstimate",
    "llama_activation_bytes", "estimate_memory", "print_memory_table", "LLAMA_SHAPES",
]  # fmt: skip

GB = 1e9  # decimal gigabyte; 1 GiB = 2**30 bytes = 1.074 GB


def quantized_nbytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes of one 4-bit tensor as `quantize_4bit` stores it: codes plus `QuantState`.

    ceil(n/2) packed bytes, one absmax per block (float32, or uint8 with double
    quantization plus one float32 per 256 blocks, an offset and the 256-value map),
    and the 16-value codebook.
    """
    blocks = -(-numel // blocksize)
    tables = 16 * 4  # the codebook
    if double_quant:
        second = -(-blocks // DOUBLE_QUANT_BLOCKSIZE)
        return (numel + 1) // 2 + blocks + 4 * second + 4 + 256 * 4 + tables
    return (numel + 1) // 2 + 4 * blocks + tables


@dataclass(frozen=True)
class ModelShape:
    """The parameter shapes training memory depends on."""

    linear: tuple[tuple[int, int], ...]  # (out, in) of each layer QLoRA quantizes, LoRA adapts
    other: int  # parameters kept unquantized: embeddings, norms, output head, biases
    config: LlamaConfig | None = None  # a LLaMA shape, needed to count activations

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.linear) + self.other

    @classmethod
    def from_model(cls, model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> ModelShape:
        """Read the shapes of a model (on any device, `meta` too), as prepare_qlora splits it."""
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        inside = tuple(f"{n}." for n, _ in lora_layers(model))  # adapters and wrapped bases
        linear, seen = [], set()
        for name, m in model.named_modules():
            base = m.base_layer if isinstance(m, LoRALinear) else m
            plain = type(base) is nn.Linear and base is not head and not _is_target(name, skip)
            if name.startswith(inside) or not (plain or isinstance(base, Linear4bit)):
                continue
            linear.append((base.out_features, base.in_features))
            seen.update(id(p) for p in m.parameters() if p is not base.bias)
        params = {id(p): p for p in model.parameters()}  # tied weights once
        other = sum(p.numel() for k, p in params.items() if k not in seen)
        return cls(tuple(linear), other, getattr(model, "config", None))

    @classmethod
    def llama(cls, config: LlamaConfig) -> ModelShape:
        """The shape of a LLaMA model of this config (built on the meta device: no memory)."""
        with torch.device("meta"):
            return cls.from_model(TinyLlama(config))


def _llama(vocab, hidden, inter, layers, heads, kv_heads) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
    )  # fmt: skip


LLAMA_SHAPES = {  # Touvron et al., 2023 (LLaMA, LLaMA 2): 7B, 13B, 65B and 70B (grouped-query)
    "LLaMA-7B": _llama(32000, 4096, 11008, 32, 32, 32),
    "LLaMA-13B": _llama(32000, 5120, 13824, 40, 40, 40),
    "LLaMA-65B": _llama(32000, 8192, 22016, 80, 64, 64),
    "LLaMA-2-70B": _llama(32000, 8192, 28672, 80, 64, 8),
}


@dataclass(frozen=True)
class Method:
    """How a fine-tuning method stores each number, in bytes per value."""

    name: str
    weight_bytes: float  # per weight of the linear layers (0: see quant)
    other_bytes: float  # per unquantized parameter: embeddings, norms, head
    full: bool  # train every parameter (else: LoRA adapters on every linear layer)
    grad_bytes: float  # per gradient of a trained value
    optimizer_bytes: float  # Adam state per trained value: 8 = m and v in fp32; 12 = + fp32 master
    activation_bytes: float  # per saved activation value (the compute dtype)
    adapter_bytes: float = 4  # per LoRA value (PEFT keeps adapters in fp32 on a 16-bit base)
    quant_blocksize: int | None = None  # 4-bit base with this blocksize (NF4); None: float base
    double_quant: bool = False  # 8-bit absmax (QLoRA's double quantization)

    def __post_init__(self):
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.name.endswith("_bytes")}
        bad = {k: v for k, v in sizes.items() if not v >= 0}
        if bad:
            raise ValueError(f"bytes per value must be >= 0, got {bad}")
        if self.quant_blocksize is None and self.weight_bytes <= 0:
            raise ValueError("a float base needs weight_bytes > 0 (or give quant_blocksize)")
        if self.quant_blocksize is not None and self.quant_blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(
                f"quant_blocksize must be one of {BLOCKSIZES_4BIT}, got {self.quant_blocksize}"
            )


METHODS = {
    "full fp32": Method("full fp32", 4, 4, True, 4, 8, 4),
    "full mixed": Method("full mixed", 2, 2, True, 2, 12, 2),
    "full bf16": Method("full bf16", 2, 2, True, 2, 8, 2),
    "full pure bf16": Method("full pure bf16", 2, 2, True, 2, 4, 2),
    "LoRA": Method("LoRA", 2, 2, False, 4, 8, 2),
    "QLoRA": Method("QLoRA", 0, 2, False, 4, 8, 2, quant_blocksize=64),
    "QLoRA + DQ": Method("QLoRA + DQ", 0, 2, False, 4, 8, 2, quant_blocksize=64, double_quant=True),
}  # full mixed: 16-bit weights and grads, fp32 master weights and Adam moments (ZeRO's 16 bytes
# per parameter); full bf16: the same without the master copy; full pure bf16: Adam in bf16 too.


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of training memory for one method (`total` is their sum)."""

    method: str
    weights: int  # the model's own weights: float, or 4-bit codes + scales + unquantized ones
    adapters: int  # LoRA A and B
    gradients: int  # one per trained value
    optimizer: int  # Adam's moments (and master weights)
    activations: int  # saved for backward (0 when the shape has no LLaMA config)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "method")

    def peak(self, paged: bool = False) -> int:
        """The largest simultaneous use, with the optimizer state paged out under pressure.

        Without paging, all parts are on the GPU at once (`total`). A paged
        optimizer lets the state leave for CPU RAM while activations peak, and come
        back for the update step, when the activations are gone: the peak is then
        the larger of the two phases. The state does not shrink.
        """
        if not paged:
            return self.total
        return self.total - min(self.optimizer, self.activations)


def llama_activation_bytes(
    config: LlamaConfig,
    batch: int,
    seq: int,
    bytes_per_value: float = 2,
    full: bool = False,
    lora_r: int = 0,
    checkpointing: bool = False,
    flash: bool = True,
) -> int:
    """Bytes autograd keeps for backward in a LLaMA, counted tensor by tensor.

    Per token and decoder layer (h hidden, i intermediate, a heads), the saved tensors are:
    each RMSNorm's input and output, plus its normalized input when its weight trains
    (2 x 3h full, 2 x 2h LoRA); q, k, v as attention sees them (k, v expanded to all
    heads) and its output, which is also o_proj's input (4h); SwiGLU's gate, up,
    silu(gate) and product (4i); and A x of each of the 7 adapters (7r). Head: the
    final norm (3h full, h LoRA) and the fp32 log-softmax of the loss (4V bytes).
    Eager attention (`flash=False`) adds the a x seq attention probabilities.
    Same method as Korthikanti et al. (2022, https://arxiv.org/abs/2205.05198), who
    count sbh(34 + 5as/h) bytes for a GPT layer; checked against the tensors
    autograd saves for the tiny LLaMA. With `checkpointing`, each layer keeps only its
    input (h per token) and one layer is recomputed at a time in backward.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    norms = 2 * (3 * h if full else 2 * h)
    attention = 4 * h + (0 if flash else config.num_attention_heads * seq)
    per_layer = norms + attention + 4 * i + 7 * lora_r
    tokens, layers = batch * seq, config.num_hidden_layers
    head = tokens * ((3 * h if full else h) * bytes_per_value + 4 * v)
    if checkpointing:
        return int(tokens * (layers * h + per_layer) * bytes_per_value + head)
    return int(tokens * layers * per_layer * bytes_per_value + head)


def estimate_memory(
    shape: ModelShape | LlamaConfig,
    method: Method | str,
    r: int = 16,
    batch: int = 1,
    seq: int = 512,
    checkpointing: bool = True,
    flash: bool = True,
) -> MemoryEstimate:
    """Training memory of one method on a model shape, in bytes (see `MemoryEstimate`).

    LoRA methods put rank-`r` adapters on every linear layer of `shape.linear`
    (all-linear, as QLoRA does); a 4-bit method stores those layers as
    `quantized_nbytes` each and the rest at `method.other_bytes`.
    """
    shape = ModelShape.llama(shape) if isinstance(shape, LlamaConfig) else shape
    if isinstance(method, str) and method not in METHODS:
        raise ValueError(f"unknown method {method!r}; give a Method or one of {list(METHODS)}")
    m = METHODS[method] if isinstance(method, str) else method
    linear = sum(o * i for o, i in shape.linear)
    if m.quant_blocksize:
        q = sum(quantized_nbytes(o * i, m.quant_blocksize, m.double_quant) for o, i in shape.linear)
    else:
        q = linear * m.weight_bytes
    weights = q + shape.other * m.other_bytes
    n_lora = 0 if m.full else r * sum(o + i for o, i in shape.linear)
    trained = shape.numel if m.full else n_lora
    acts = 0
    if shape.config is not None:
        rank = 0 if m.full else r
        acts = llama_activation_bytes(
            shape.config, batch, seq, m.activation_bytes, m.full, rank, checkpointing, flash
        )
    return MemoryEstimate(
        m.name, int(weights), int(n_lora * m.adapter_bytes), int(trained * m.grad_bytes),
        int(trained * m.optimizer_bytes), acts,
    )  # fmt: skip


def print_memory_table(estimates: dict[str, MemoryEstimate], unit: float = GB) -> None:
    """One row per estimate: each part and the total, in GB (10^9 bytes) by default."""
    parts = [f.name for f in fields(MemoryEstimate) if f.name != "method"]
    label = "GB" if unit == GB else "GiB" if unit == 2**30 else f"x{unit:g} B"
    width = max(12, *(len(k) for k in estimates)) + 2
    print(f"{'(' + label + ')':<{width}}" + "".join(f"{p:>12}" for p in [*parts, "total"]))
    for name, est in estimates.items():
        values = [getattr(est, p) for p in parts] + [est.total]
        print(f"{name:<{width}}" + "".join(f"{_fmt(v / unit):>12}" for v in values))


def _fmt(x: float) -> str:
    """3 significant figures, without scientific notation for the sizes we print."""
    if x == 0:
        return "0"
    digits = max(0, 2 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"
