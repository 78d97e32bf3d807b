"""Quantization for QLoRA: absmax int8/int4, blockwise scales, NF4/FP4, double quantization.

Store a weight as small integers plus a scale. Absmax quantization maps x to
q = round(x / s) with s = max(abs(x)) / (2^(b-1) - 1); one outlier inflates s and
wipes out the small values, so blockwise quantization keeps one scale per block
of 64 values and the outlier hurts only its own block. QLoRA (Dettmers et al.,
2023, https://arxiv.org/abs/2305.14314) stores 4-bit indices into a 16-value
codebook (NF4 or FP4, see `quant_codebooks`), packed two per byte:

    w ~= code[q] * absmax_b,    q = argmin_j abs(w / absmax_b - code_j),   b = block of w

That costs 4 + 32/64 = 4.5 bits per parameter. Double quantization stores the
absmax themselves in 8 bits (blocks of 256, signed dynamic map):

    absmax_b ~= code2[q2_b] * absmax2_(b // 256) + mean(absmax)     (~4.127 bits)

`quantize_4bit` matches bitsandbytes' CPU `quantize_4bit` bit for bit (same
float32 arithmetic, same tie rule, same padding), and `Linear4bit` is a frozen
4-bit linear layer whose backward re-dequantizes instead of saving the weight.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lora_edu.quant_codebooks import (
    _TINY,
    BLOCKSIZES_4BIT,
    DOUBLE_QUANT_BLOCKSIZE,
    DTYPES_4BIT,
    NF4_OFFSET,
    _check_bits,
    _check_blocksize,
    _check_float,
    _check_packed,
    decode_4bit,
    decode_blocks,
    dequantize_blockwise_dynamic,
    dynamic_map,
    fp4_codebook,
    nearest_code,
    nf4_codebook,
    pack_4bit,
    quantize_blockwise_dynamic,
    scale_blocks,
    unpack_4bit,
)

__all__ = [
    "absmax_quantize",
    "absmax_dequantize",
    "quantize_blockwise_absmax",
    "dequantize_blockwise_absmax",
    "BLOCKSIZES_4BIT",
    "NF4_OFFSET",
    "nf4_codebook",
    "fp4_codebook",
    "dynamic_map",
    "scale_blocks",
    "nearest_code",
    "decode_blocks",
    "decode_4bit",
    "pack_4bit",
    "unpack_4bit",
    "quantize_blockwise_dynamic",
    "dequantize_blockwise_dynamic",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "Linear4bit",
]


def absmax_quantize(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization with one tensor-wide scale.

    Args:
        x: a float tensor of any shape.
        bits: 8 for int8 (levels -127..127), 4 for int4 (-7..7); any of 2..8.

    Returns:
        (q, scale): int8 codes shaped like `x` and a float32 scalar
        scale = max(abs(x)) / (2^(bits-1) - 1), so that x ~= q * scale.
    """
    _check_float(x, "x")
    qmax = _check_bits(bits)
    scale = x.float().abs().max() / qmax  # ()
    q = torch.round(x.float() / scale.clamp(min=_TINY))  # round half to even
    return q.clamp(-qmax, qmax).to(torch.int8), scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Undo `absmax_quantize`: q * scale, as float32 (`scale` may be per row, broadcast)."""
    return q.float() * scale


def quantize_blockwise_absmax(
    x: torch.Tensor, blocksize: int = 64, bits: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization with one scale per block of `blocksize` consecutive elements.

    The flattened tensor is cut into blocks (the last may be shorter); an outlier
    inflates only its own block's scale.

    Args:
        x: a float tensor of any shape.
        blocksize: elements per scale.
        bits: 8 for int8, 4 for int4; any of 2..8.

    Returns:
        (q, scales): int8 codes shaped like `x` and (ceil(numel / blocksize),)
        float32 scales.
    """
    _check_float(x, "x")
    _check_blocksize(blocksize)
    qmax = _check_bits(bits)
    flat = x.reshape(-1).float()
    n, pad = flat.numel(), -flat.numel() % blocksize
    blocks = F.pad(flat, (0, pad)).view(-1, blocksize)  # (n_blocks, blocksize)
    scales = blocks.abs().amax(dim=1) / qmax  # (n_blocks,)
    q = torch.round(blocks / scales.clamp(min=_TINY)[:, None]).clamp(-qmax, qmax)
    return q.reshape(-1)[:n].view(x.shape).to(torch.int8), scales


def dequantize_blockwise_absmax(
    q: torch.Tensor, scales: torch.Tensor, blocksize: int = 64
) -> torch.Tensor:
    """Undo `quantize_blockwise_absmax`: each code times its block's scale, float32."""
    return decode_blocks(q.reshape(-1), None, scales, blocksize).view(q.shape)


@dataclass
class QuantState:
    """Everything besides the packed codes that `dequantize_4bit` needs."""

    absmax: torch.Tensor  # (n_blocks,) float32 scales; uint8 codes into code2 if double-quantized
    shape: torch.Size  # the original tensor's shape
    dtype: torch.dtype  # the original dtype, restored by dequantize_4bit
    blocksize: int  # elements per absmax
    quant_type: str  # "nf4" or "fp4"
    code: torch.Tensor  # (16,) float32 codebook the 4-bit indices point into
    offset: torch.Tensor | None = None  # () float32 mean of the absmax (double quantization)
    absmax2: torch.Tensor | None = None  # (ceil(n_blocks / 256),) float32 scales of the codes
    code2: torch.Tensor | None = None  # (256,) float32 dynamic map (double quantization)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        _check_blocksize(self.blocksize, BLOCKSIZES_4BIT)
        if self.double_quant != (self.absmax.dtype == torch.uint8):
            raise ValueError(
                "absmax must be uint8 codes exactly when offset, absmax2 and code2 are all "
                f"given (double quantization); got absmax of dtype {self.absmax.dtype}"
            )
        if self.absmax.numel() != -(-self.shape.numel() // self.blocksize):
            raise ValueError(
                f"{self.absmax.numel()} absmax values do not fit shape {tuple(self.shape)} "
                f"at blocksize {self.blocksize}"
            )

    @property
    def double_quant(self) -> bool:
        return self.offset is not None and self.absmax2 is not None and self.code2 is not None

    def dequantize_absmax(self) -> torch.Tensor:
        """The float32 block scales: stored as is, or decoded from their 8-bit codes."""
        if not self.double_quant:
            return self.absmax.float()
        q2 = self.absmax.reshape(-1)
        return decode_blocks(q2, self.code2, self.absmax2, DOUBLE_QUANT_BLOCKSIZE) + self.offset

    def nbytes(self) -> int:
        """Bytes of every tensor the state stores (scales, codebooks, offset)."""
        tensors = (getattr(self, f.name) for f in fields(self))
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def bits_per_parameter(self) -> float:
        """Bits per original element: packed codes (ceil(n/2) bytes) plus `nbytes()`."""
        n = self.shape.numel()
        return 8 * ((n + 1) // 2 + self.nbytes()) / n


def _codebook(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return nf4_codebook()
    if quant_type == "fp4":
        return fp4_codebook()
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> tuple[torch.Tensor, QuantState]:
    """Blockwise 4-bit quantization (NF4 or FP4), bit-identical to bitsandbytes on CPU.

    Each block of `blocksize` consecutive elements (the last may be shorter) is
    divided by its absmax and every element gets the index of the nearest code
    (ties to the lower code). An odd count is padded with the value 0 before
    coding, so the last low nibble holds the code of 0.0 (7 for NF4).

    Bad input is refused where bitsandbytes (0.50, CPU) is silent. A NaN or inf
    raises ValueError: bitsandbytes stores a NaN or inf absmax for that block, and
    every value of the block then decodes to NaN or inf. An empty tensor raises
    ValueError (bitsandbytes returns empty codes). Integer, bool, complex and float64
    tensors raise ValueError, and so does a blocksize outside 32, 64, ..., 4096 or a
    quant_type other than "nf4" and "fp4", as in bitsandbytes.

    Args:
        w: a finite, non-empty float16/bfloat16/float32 tensor of any shape.
        quant_type: "nf4" or "fp4".
        blocksize: one of 32, 64, 128, ..., 4096.
        double_quant: also quantize the absmax to 8 bits (bitsandbytes'
            `compress_statistics=True`).

    Returns:
        (packed, state): (ceil(numel / 2), 1) uint8 codes and a `QuantState`.
    """
    _check_float(w, "w", DTYPES_4BIT)
    code = _codebook(quant_type)  # (16,)
    _check_blocksize(blocksize, BLOCKSIZES_4BIT)
    scaled, absmax = scale_blocks(w.reshape(-1).float(), blocksize)  # (n,), (n_blocks,)
    scaled = F.pad(scaled, (0, scaled.numel() % 2))  # pad the value 0, as bitsandbytes
    packed = pack_4bit(nearest_code(scaled, code))  # (ceil(n/2), 1)
    state = QuantState(absmax, w.shape, w.dtype, blocksize, quant_type, code)
    if double_quant:
        offset = absmax.mean()  # ()
        q2, absmax2 = quantize_blockwise_dynamic(absmax - offset)  # (n_blocks,), (n_blocks2,)
        state = QuantState(
            q2, w.shape, w.dtype, blocksize, quant_type, code, offset, absmax2, dynamic_map()
        )
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """Undo `quantize_4bit`: code[q] * absmax of the block, in the original shape and dtype.

    Raises:
        ValueError: if `packed` does not hold ceil(numel / 2) bytes for `state.shape`.
    """
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    n = state.shape.numel()
    # = decode_blocks(unpack_4bit(packed, n), ...), with one lookup per two bytes
    w = decode_4bit(packed, state.code, state.dequantize_absmax(), state.blocksize, n)  # (n,)
    return w.view(state.shape).to(state.dtype)


_STATE_TENSORS = ("absmax", "code", "offset", "absmax2", "code2")


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; backward dequantizes again (no weight grad)."""

    @staticmethod
    def forward(ctx, x, packed, state):
        ctx.save_for_backward(packed, *(getattr(state, f) for f in _STATE_TENSORS))
        # shape, dtype, blocksize, quant_type; the tensors live in saved_tensors only
        ctx.meta = {f.name: getattr(state, f.name) for f in fields(state)}
        ctx.meta = {k: v for k, v in ctx.meta.items() if k not in _STATE_TENSORS}
        return F.linear(x, dequantize_4bit(packed, state).to(x.dtype))  # W freed after this

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        packed, *tensors = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        state = QuantState(**ctx.meta, **dict(zip(_STATE_TENSORS, tensors)))
        w = dequantize_4bit(packed, state).to(grad_out.dtype)  # (out, in), rebuilt
        return grad_out @ w, None, None  # (..., in)


class Linear4bit(nn.Module):
    """A frozen linear layer stored as packed 4-bit codes (QLoRA's base layer).

    Buffers: `packed` and the `QuantState` tensors; `bias` is a frozen
    parameter; there is no `weight`. `dequantize()` gives the float weight, the
    protocol LoRA uses to merge or to take norms. The forward pass saves only
    the packed codes for backward and dequantizes again there.
    """

    def __init__(
        self,
        packed: torch.Tensor,
        state: QuantState,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got {tuple(state.shape)}")
        _check_packed(packed, state.shape.numel())  # raises if packed does not fit the state
        self.out_features, self.in_features = state.shape
        self.register_buffer("packed", packed)
        for name in _STATE_TENSORS:
            self.register_buffer(name, getattr(state, name))
        self.quant_type = state.quant_type
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype  # the dtype the weight had before quantization
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        compute_dtype: torch.dtype = torch.float32,
    ) -> Linear4bit:
        """Quantize an `nn.Linear`'s weight (see `quantize_4bit`); its bias is kept as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_4bit(linear.weight.detach(), quant_type, blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> QuantState:
        tensors = {name: getattr(self, name) for name in _STATE_TENSORS}
        shape = (self.out_features, self.in_features)
        meta = dict(dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type)
        return QuantState(shape=shape, **meta, **tensors)

    def dequantize(self) -> torch.Tensor:
        """The float weight, (out_features, in_features), in `compute_dtype`."""
        return dequantize_4bit(self.packed, self.quant_state).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Linear4bitFunction.apply(x.to(self.compute_dtype), self.packed, self.quant_state)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)  # (..., out_features)

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the buffers; `.half()`/`.to(dtype)` must not round the scales."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def logical_numel(self) -> int:
        """Parameters this layer represents: out * in weights (+ bias), not packed bytes."""
        bias = 0 if self.bias is None else self.bias.numel()
        return self.out_features * self.in_features + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}, double_quant={self.absmax2 is not None}, "
            f"compute_dtype={self.compute_dtype}, "
            f"bits_per_parameter={self.quant_state.bits_per_parameter():.3f}"
        )
