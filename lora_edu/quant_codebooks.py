"""Codebooks and codes: the building blocks of blockwise 4-bit and 8-bit quantization.

A block of weights is divided by its absolute maximum (`scale_blocks`), each
element is replaced by the index of the nearest value of a short codebook in
[-1, 1] (`nearest_code`), and two 4-bit indices share a byte (`pack_4bit`).
Decoding is a lookup times the block's absmax (`decode_blocks`). Codebooks:

- NF4 (QLoRA, Dettmers et al., 2023, https://arxiv.org/abs/2305.14314, Sec. 3):
  16 quantiles of N(0, 1), so normally distributed weights use each code about
  equally often.
- FP4: a 4-bit float (1 sign, 2 exponent, 1 mantissa bit) in bitsandbytes'
  conventions, indexed by its bit pattern.
- The signed 8-bit dynamic map (Dettmers, 2015, https://arxiv.org/abs/1511.04561;
  8-bit optimizers, https://arxiv.org/abs/2110.02861): a decimal exponent plus
  a linear fraction, used by double quantization for the block scales.

Each table is built from its definition, in the float32/float64 steps that make
it equal to bitsandbytes' table bit for bit (tests/test_quant.py). `quant`
assembles these pieces into `quantize_4bit` and `Linear4bit`.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

__all__ = [
    "NF4_OFFSET",
    "nf4_codebook",
    "fp4_codebook",
    "dynamic_map",
    "scale_blocks",
    "nearest_code",
    "decode_blocks",
    "pack_4bit",
    "unpack_4bit",
    "decode_4bit",
    "quantize_blockwise_dynamic",
    "dequantize_blockwise_dynamic",
]

# Outermost quantile level of NF4: halfway between the centres of the last of
# 15 and of 16 equal-probability bins, 1/2 * [(1 - 1/30) + (1 - 1/32)].
NF4_OFFSET = 0.9677083
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
DTYPES_4BIT = (torch.float16, torch.bfloat16, torch.float32)
DOUBLE_QUANT_BLOCKSIZE = 256  # bitsandbytes' block for the 8-bit absmax codes
_TINY = 1e-38  # bitsandbytes divides by max(absmax, 1e-38): an all-zero block stays 0


def _check_float(x: torch.Tensor, name: str, dtypes: tuple | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = dtypes or (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be a floating-point tensor ({names}), got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    if not torch.isfinite(x).all():
        raise ValueError(
            f"{name} contains NaN or inf; quantization needs finite values "
            "(one inf would become its block's absmax and turn every other value into 0)"
        )


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    return 2 ** (bits - 1) - 1  # largest integer level, 127 for int8, 7 for int4


def _check_blocksize(blocksize: int, allowed: tuple | None = None) -> None:
    ok = isinstance(blocksize, int) and not isinstance(blocksize, bool) and blocksize > 0
    if not ok or (allowed is not None and blocksize not in allowed):
        want = f"one of {allowed}" if allowed else "a positive integer"
        raise ValueError(f"blocksize must be {want}, got {blocksize!r}")


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values, sorted, as float32: bitsandbytes' `get_4bit_type("nf4")`.

    QLoRA's quantile rule q_i = 1/2 [Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))],
    with Q the normal inverse CDF, gives Q(0) = -inf and Q(1) = +inf at the ends,
    and with 16 symmetric levels no level is 0 (the median falls between two).
    bitsandbytes' `create_normal_map(offset=0.9677083, use_extra_value=True)`
    fixes both. It stops the quantile levels at `offset` < 1 instead of 1:
    0.9677083 = 1/2 [(1 - 1/30) + (1 - 1/32)], halfway between the centre of
    the last of 15 equal-probability bins and of the last of 16. It builds each
    sign from its own half of the distribution: 8 positive values at levels
    evenly spaced from `offset` down to (not including) 0.5, 7 negative ones the
    same way, and an exact 0 as the 16th. The 8/7 split is what makes room for
    an exact zero (zero weights and padding are stored without error) at the
    price of one more level on the positive side. Finally all values are
    divided by the largest, Q(offset), so the codebook spans [-1, 1].

    Precision: the levels are float32 (`torch.linspace`), Q is evaluated in
    float64 (`torch.special.ndtri`), the values are rounded to float32 and then
    divided in float32. That is how bitsandbytes made its table (scipy on float32
    levels); of the eight float32/float64 choices for these three steps it is
    the only one that reproduces all 16 values exactly.

    Returns:
        A (16,) float32 tensor, ascending, with code[0] = -1, code[7] = 0, code[15] = 1.
    """
    pos_levels = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1]  # (8,) float32, offset .. >0.5
    neg_levels = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1]  # (7,)
    pos = torch.special.ndtri(pos_levels.double()).float()  # (8,) > 0
    neg = -torch.special.ndtri(neg_levels.double()).float()  # (7,) < 0
    values = torch.cat([neg, torch.zeros(1), pos]).sort().values  # (16,)
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """The 16 FP4 values in bit-pattern order: code[i] is the value of the 4 bits of i.

    Bit layout `s e1 e0 m`: a sign s, a 2-bit exponent field e and a 1-bit
    mantissa m. bitsandbytes counts the exponent downwards (as in its
    `create_fp8_map`, with bias 2^(2-1) = 2): a normal number (e > 0) is
    (1 + m/2) * 2^(bias + 1 - e), so e = 1, 2, 3 give {4, 6}, {2, 3}, {1, 1.5}.
    Pattern e = 0 holds 0 and one subnormal, which bitsandbytes' kernels set to
    m * 2^-5 (= 0.0625 / 12 of the maximum, not the 2^-3 of `create_fp8_map`).
    Dividing by the maximum, 6, gives [0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4]
    for s = 0 and their negatives for s = 1; pattern 1000 is -0.0 (bitsandbytes
    stores +0.0 there; the two compare equal).

    Returns:
        A (16,) float32 tensor, not sorted, max(abs(code)) = 1.
    """
    bits = torch.arange(16)
    sign, e, m = bits >> 3, (bits >> 1) & 0b11, (bits & 1).double()  # (16,) each
    bias = 2
    normal = (1 + m / 2) * torch.exp2((bias + 1 - e).double())  # (16,), for e > 0
    subnormal = m * 2.0**-5  # (16,), for e == 0
    magnitude = torch.where(e > 0, normal, subnormal).float()
    values = torch.where(sign == 1, -magnitude, magnitude)
    return values / magnitude.max()


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True)`, sorted.

    Layout of a byte: a sign bit, then a run of zeros whose length E sets the
    decade 10^-E, an indicator bit 1, and the remaining 6 - E bits as a linear
    fraction. Decade 10^-E (E = 0..6) thus holds 2^(6-E) values: the midpoints of
    2^(6-E) equal bins of [0.1, 1], times 10^-E. Small numbers get few fraction
    bits but a wide range (down to about 1e-7); large ones get many. Per sign that
    is 64 + 32 + ... + 1 = 127 values; with their negatives, 0 and 1.0 the map
    has 256 entries. Computed in float32 (linspace, midpoints and the decade
    factor), as bitsandbytes does, so the table matches bit for bit.

    Returns:
        A (256,) float32 tensor, ascending, from about -0.993 to 1.0, holding 0 once.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** (6 - e) + 1)  # (2^(6-E) + 1,) float32
        fractions = (edges[:-1] + edges[1:]) / 2  # bin midpoints
        decade = fractions * 10.0**-e  # float32
        parts += [decade, -decade]
    return torch.cat(parts).sort().values  # (256,)


def scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the elements divided by it, in bitsandbytes' float32 steps.

    Blocks are `blocksize` consecutive elements of `flat` (the last may be
    shorter). Full blocks are multiplied by float32(1 / absmax), the partial last
    block is divided by its absmax, and results are clamped to [-1, 1]: the same
    roundings as bitsandbytes' CPU kernel, which is what makes codes bit-identical.
    A zero block divides by 1e-38 and stays 0; its absmax is stored as 0.

    Returns:
        (scaled, absmax): (n,) float32 in [-1, 1] and (ceil(n / blocksize),) float32.
    """
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)  # (full_blocks, blocksize)
    absmax = head.abs().amax(dim=1)  # (full_blocks,)
    scaled = [(head * (1.0 / absmax.clamp(min=_TINY))[:, None]).reshape(-1)]  # times 1/absmax
    if full < n:  # the last, partial block is divided, not multiplied by the reciprocal
        tail_max = flat[full:].abs().amax()
        scaled.append(flat[full:] / tail_max.clamp(min=_TINY))
        absmax = torch.cat([absmax, tail_max[None]])
    return torch.cat(scaled).clamp(-1, 1), absmax  # (n,), (n_blocks,)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for every element; ties go to the lower value.

    The codebook is sorted (stably, so equal values such as FP4's +0 and -0 keep
    their index order) and each element is bucketed against the midpoints
    between neighbouring values: with `torch.bucketize(right=False)`, an element
    exactly on a midpoint takes the lower code, as bitsandbytes' CPU kernel does.
    With FP4, +0 (pattern 0000) sorts before -0 (1000), so values in
    (-1/384, 0] get 0000 and tiny positive values (0, 1/384] get 1000, as in
    bitsandbytes; both decode to 0.

    Args:
        scaled: a float32 tensor of any shape, usually in [-1, 1].
        code: a (k,) float32 codebook, in any order.

    Returns:
        An int64 tensor shaped like `scaled` with indices into `code`.
    """
    values, order = torch.sort(code, stable=True)  # (k,), (k,)
    midpoints = (values[:-1] + values[1:]) / 2  # (k - 1,) in the codebook's dtype
    return order[torch.bucketize(scaled, midpoints)]  # same shape as scaled


def decode_blocks(
    idx: torch.Tensor, code: torch.Tensor | None, absmax: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Flat float32 values code[idx] (or idx itself, if `code` is None) times their block's absmax."""
    values = idx.float() if code is None else code[idx.long()]  # (n,)
    return values * absmax.float().repeat_interleave(blocksize)[: values.numel()]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (0..15) two per byte, the first in the high nibble.

    Args:
        codes: an integer tensor of any shape (flattened) with values in [0, 15].

    Returns:
        A (ceil(n / 2), 1) uint8 tensor; an odd count is padded with code 0.
    """
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() > 15):
        raise ValueError(f"4-bit codes must lie in [0, 15], got [{flat.min()}, {flat.max()}]")
    flat = F.pad(flat, (0, flat.numel() % 2))  # even length
    return ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)[:, None]  # (ceil(n/2), 1)


def _check_packed(packed: torch.Tensor, n: int) -> None:
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed holds {packed.numel()} bytes but {n} codes need {(n + 1) // 2}; "
            "was it made from another tensor than the one its state describes?"
        )


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_4bit`: the first `n` codes as an int64 (n,) tensor."""
    _check_packed(packed, n)
    flat = packed.reshape(-1).long()  # (ceil(n/2),)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]  # (n,)


def quantize_blockwise_dynamic(
    x: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the signed dynamic map (used for double quantization).

    Returns:
        (q, absmax): uint8 indices into `dynamic_map()` shaped like `x`, and the
        (ceil(numel / blocksize),) float32 absmax of each block.
    """
    _check_float(x, "x")
    _check_blocksize(blocksize)
    scaled, absmax = scale_blocks(x.reshape(-1).float(), blocksize)  # (n,), (n_blocks,)
    return nearest_code(scaled, dynamic_map()).to(torch.uint8).view(x.shape), absmax


def dequantize_blockwise_dynamic(
    q: torch.Tensor, absmax: torch.Tensor, blocksize: int = DOUBLE_QUANT_BLOCKSIZE
) -> torch.Tensor:
    """Undo `quantize_blockwise_dynamic`: dynamic_map()[q] * absmax of the block, float32."""
    return decode_blocks(q.reshape(-1), dynamic_map(), absmax, blocksize).view(q.shape)


def decode_4bit(
    packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int
) -> torch.Tensor:
    """`decode_blocks(unpack_4bit(packed, n), code, absmax, blocksize)`, computed faster.

    Two bytes hold four codes. Reading the bytes in pairs as 16-bit numbers, a table
    with a row for each of the 65,536 possible pairs gives all four values in one
    lookup; then one in-place multiply per block. On a 2-core CPU this is about 5x
    faster than unpacking each nibble into an int64 index (benchmarks/), and it gives
    the same float32 values bit for bit.
    """
    _check_packed(packed, n)
    data = packed.reshape(-1).contiguous()  # (ceil(n/2),) uint8
    if data.numel() % 2 or data.storage_offset() % 2:  # an odd count, or a misaligned view
        data = torch.cat([data, data.new_zeros(data.numel() % 2)])
    pairs = data.view(torch.int16).int() & 0xFFFF  # (ceil(n/4),) in [0, 65535]
    values = _pair_table(tuple(code.tolist()), code.device).index_select(0, pairs)  # (., 4)
    values = values.reshape(-1)[:n]  # (n,) float32 code values
    full = n - n % blocksize  # elements in whole blocks
    absmax = absmax.float()
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    values[full:].mul_(absmax[-1])  # the last, shorter block (empty if there is none)
    return values


@functools.lru_cache(maxsize=8)
def _pair_table(code: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(65536, 4) float32: row b0 + 256 * b1 holds the codes of bytes b0 then b1, high nibble first."""
    table = torch.tensor(code, dtype=torch.float32, device=device)  # (16,)
    u = torch.arange(65536, device=device)
    b0, b1 = u & 0xFF, u >> 8  # the first byte is the low half of a little-endian int16
    if sys.byteorder == "big":
        b0, b1 = b1, b0
    return torch.stack([table[b0 >> 4], table[b0 & 0xF], table[b1 >> 4], table[b1 & 0xF]], dim=1)
