"""lora_edu.quant: absmax, codebooks, packing, 4-bit quantization, Linear4bit.

bitsandbytes is the reference: codebooks and packed codes must match it bit for
bit. Its CPU `dequantize_4bit` is wrong for some shapes (see FACTS.md), so values
are compared by decoding its codes and absmax ourselves, never through it.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_edu import quant
from lora_edu.quant import (
    Linear4bit,
    QuantState,
    dequantize_4bit,
    dynamic_map,
    fp4_codebook,
    nf4_codebook,
    pack_4bit,
    quantize_4bit,
    unpack_4bit,
)

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bits(t):
    return t.contiguous().view(torch.int32)


def _weight(shape, dtype=torch.float32, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def _decode_bnb(packed, state, dq_absmax=None):
    """Values of bitsandbytes' codes: code[q] * absmax, computed here, not by bitsandbytes."""
    n = state.shape.numel()
    absmax = state.absmax if dq_absmax is None else dq_absmax
    return quant.decode_blocks(unpack_4bit(packed, n), state.code, absmax, state.blocksize)


# --- codebooks -------------------------------------------------------------------------


def test_nf4_codebook_equals_bitsandbytes_bit_for_bit():
    ref = bnbf.get_4bit_type("nf4", device="cpu")
    assert nf4_codebook().dtype == torch.float32
    assert torch.equal(_bits(nf4_codebook()), _bits(ref))


def test_nf4_has_exact_zero_and_an_8_over_7_split():
    code = nf4_codebook()
    assert torch.all(code[1:] > code[:-1])
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    assert quant.NF4_OFFSET == pytest.approx(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)), abs=1e-7)


def test_fp4_codebook_equals_bitsandbytes_in_bit_pattern_order():
    ref = bnbf.get_4bit_type("fp4", device="cpu")
    ours = fp4_codebook()
    assert torch.equal(ours, ref)  # -0.0 == 0.0
    assert torch.equal(_bits(ours)[:8], _bits(ref)[:8])
    assert torch.equal(_bits(ours)[9:], _bits(ref)[9:])
    assert str(ours[8].item()) == "-0.0"  # pattern 1000; bitsandbytes' list has int -0 == +0
    expected = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    assert torch.equal(ours[:8], expected) and torch.equal(ours[8:], -expected)


def test_dynamic_map_equals_bitsandbytes_bit_for_bit():
    ref = bnbf.create_dynamic_map(signed=True)
    ours = dynamic_map()
    assert ours.shape == (256,) and torch.equal(_bits(ours), _bits(ref))
    assert (ours == 0).sum() == 1 and ours[-1] == 1


def test_nearest_code_ties_go_to_the_lower_code():
    code = torch.tensor([0.5, -1.0, 0.0, 1.0])  # unsorted on purpose
    x = torch.tensor([-0.5, 0.25, 0.75, -0.51, 0.26, 2.0, -2.0])
    assert quant.nearest_code(x, code).tolist() == [1, 2, 0, 1, 0, 3, 1]


# --- absmax int8 / int4 ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_absmax_error_is_at_most_half_a_step(bits):
    x = _weight((50, 40), std=1.0)
    q, scale = quant.absmax_quantize(x, bits=bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() == qmax
    assert torch.allclose(scale, x.abs().max() / qmax)
    err = (quant.absmax_dequantize(q, scale) - x).abs().max()
    assert err <= scale / 2 * (1 + 1e-6)


def test_one_outlier_ruins_a_tensor_wide_scale_but_only_its_block():
    x = _weight((64, 64), std=1.0)
    x[0, 0] = 1000.0
    q, s = quant.absmax_quantize(x, bits=8)
    tensor_err = (quant.absmax_dequantize(q, s) - x)[1:].abs().mean()
    qb, sb = quant.quantize_blockwise_absmax(x, blocksize=64, bits=8)
    block_err = (quant.dequantize_blockwise_absmax(qb, sb, 64) - x)[1:].abs().mean()
    assert torch.count_nonzero(q[1:]) < 0.01 * q[1:].numel()  # nearly everything rounds to 0
    assert block_err < tensor_err / 50


def test_blockwise_absmax_handles_a_partial_last_block():
    x = _weight((7, 9), std=1.0)
    q, scales = quant.quantize_blockwise_absmax(x, blocksize=16, bits=4)
    assert q.shape == x.shape and scales.shape == (4,)  # ceil(63 / 16)
    assert torch.isclose(scales[-1], x.reshape(-1)[48:].abs().max() / 7)
    err = (quant.dequantize_blockwise_absmax(q, scales, 16) - x).abs().reshape(-1)
    assert torch.all(err <= scales.repeat_interleave(16)[:63] / 2 * (1 + 1e-6))


# --- packing ---------------------------------------------------------------------------


def test_pack_puts_the_first_code_in_the_high_nibble_and_pads_odd_counts():
    packed = pack_4bit(torch.tensor([1, 2, 3]))
    assert packed.dtype == torch.uint8 and packed.shape == (2, 1)
    assert packed.flatten().tolist() == [0x12, 0x30]
    assert unpack_4bit(packed, 3).tolist() == [1, 2, 3]


def test_pack_rejects_out_of_range_and_float_codes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_4bit(torch.tensor([16]))
    with pytest.raises(ValueError, match="integer"):
        pack_4bit(torch.tensor([1.0]))


# --- quantize_4bit against bitsandbytes ------------------------------------------------

SHAPES = [(13, 64), (64, 96), (7, 9), (1, 1), (3, 5, 7)]


@pytest.mark.parametrize(
    "quant_type,blocksize,shape,dtype",
    list(itertools.product(["nf4", "fp4"], [64, 128], SHAPES, DTYPES))
    + [("nf4", 32, (13, 64), torch.float32), ("fp4", 4096, (64, 96), torch.float16)],
)
def test_packed_codes_and_absmax_are_bit_identical_to_bitsandbytes(
    quant_type, blocksize, shape, dtype
):
    w = _weight(shape, dtype, seed=sum(shape))
    packed, state = quantize_4bit(w, quant_type, blocksize)
    ref_packed, ref_state = bnbf.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(_bits(state.absmax), _bits(ref_state.absmax))
    ours = dequantize_4bit(packed, state)
    assert ours.shape == w.shape and ours.dtype == dtype
    assert torch.equal(ours, _decode_bnb(ref_packed, ref_state).view(shape).to(dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_blocks_match_bitsandbytes(quant_type):
    w = _weight((5, 64), seed=3)
    w[1] = 0  # a full zero block
    w = w.reshape(-1)[:300].clone()
    w[256:] = 0  # a partial zero block at the end
    packed, state = quantize_4bit(w, quant_type, 64)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax[:4], ref_state.absmax[:4]) and state.absmax[1] == 0
    # bitsandbytes stores its 1e-38 guard as the absmax of a trailing zero block; we store 0
    assert state.absmax[4] == 0 and 0 < ref_state.absmax[4] <= 1e-38
    assert torch.count_nonzero(dequantize_4bit(packed, state)[64:128]) == 0


def test_odd_count_pads_with_the_code_of_zero():
    packed, _ = quantize_4bit(torch.tensor([1.0]), "nf4")
    assert packed.flatten().tolist() == [(15 << 4) | 7]  # 1.0 -> 15, padding value 0.0 -> 7


def test_fp4_tiny_positive_values_get_the_negative_zero_pattern_like_bitsandbytes():
    w = torch.tensor([1.0, 0.001, -0.001, 0.0, -0.0, 0.003])
    packed, _ = quantize_4bit(w, "fp4")
    ref, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert unpack_4bit(packed, 6).tolist() == [3, 8, 0, 0, 0, 1]
    assert torch.equal(packed, ref)


@pytest.mark.parametrize("shape,quant_type", [((1024, 1024), "nf4"), ((333, 777), "fp4")])
def test_double_quant_matches_bitsandbytes_up_to_counted_near_ties(shape, quant_type):
    w = _weight(shape, seed=1)
    packed, state = quantize_4bit(w, quant_type, 64, double_quant=True)
    ref_packed, ref = bnbf.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=True
    )
    assert torch.equal(packed, ref_packed)  # 4-bit codes: identical
    assert torch.equal(state.offset, ref.offset)
    assert torch.equal(state.absmax2, ref.state2.absmax)
    assert torch.equal(state.code2, ref.state2.code)
    mine, theirs = state.absmax.long(), ref.absmax.long()
    bad = (mine != theirs).nonzero().flatten()
    assert len(bad) <= 0.005 * mine.numel()  # seen: 22 of 16384 (nf4), 10 of 4043 (fp4)
    # each mismatch is a near-tie: the value lies within 1.5e-5 of bitsandbytes' bucket
    _, plain = quantize_4bit(w, quant_type, 64)
    scaled, _ = quant.scale_blocks(plain.absmax - state.offset, 256)  # (n_blocks,)
    code2 = state.code2
    lo = (code2[theirs[bad]] + code2[(theirs[bad] - 1).clamp(min=0)]) / 2
    hi = (code2[theirs[bad]] + code2[(theirs[bad] + 1).clamp(max=255)]) / 2
    s = scaled[bad]
    assert torch.all((s >= lo - 1.5e-5) & (s <= hi + 1.5e-5))
    # so decoded absmax agree within one 8-bit step (plus that 1.5e-5 near zero)
    ref_absmax = quant.decode_blocks(theirs, code2, ref.state2.absmax, 256) + ref.offset
    ours = state.dequantize_absmax()
    gap = torch.cat([code2[1:] - code2[:-1], torch.zeros(1)])  # (256,) step above each code
    step = torch.maximum(gap[mine], gap[(mine - 1).clamp(min=0)]) + 3e-5
    block2 = torch.arange(mine.numel()) // 256
    assert torch.all((ours - ref_absmax).abs() <= step * state.absmax2[block2] * (1 + 1e-5))


# --- QuantState and memory -------------------------------------------------------------


def test_bits_per_parameter_for_a_4096_square_weight():
    n = 4096 * 4096
    for dq, expected in [(False, 4.5), (True, 4 + 8 / 64 + 32 / (64 * 256))]:
        tables = 16 * 4 + (256 * 4 + 4 if dq else 0)  # code, code2, offset
        _, state = quantize_4bit(torch.ones(4096, 4096), double_quant=dq)
        assert state.bits_per_parameter() == pytest.approx(expected + 8 * tables / n, rel=1e-9)
    assert round(state.bits_per_parameter(), 3) == 4.127


def test_small_tensors_pay_for_the_shared_tables():
    _, state = quantize_4bit(torch.ones(1, 1))
    assert state.nbytes() == 4 + 16 * 4  # one absmax, the codebook
    assert state.bits_per_parameter() == 8 * (1 + 4 + 64)


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w,kwargs,match",
    [
        (torch.ones(4, 64), {"blocksize": 48}, "blocksize must be one of"),
        (torch.ones(4, 64), {"blocksize": 8192}, "blocksize must be one of"),
        (torch.ones(4, 64), {"quant_type": "int4"}, "'nf4' or 'fp4'"),
        (torch.ones(4, 64, dtype=torch.int32), {}, "floating-point"),
        (torch.ones(4, 64, dtype=torch.float64), {}, "float16, bfloat16, float32"),
        (torch.ones(0, 64), {}, "empty"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN or inf"),
        (torch.tensor([1.0, float("inf")]), {}, "NaN or inf"),
    ],
)
def test_quantize_4bit_rejects_bad_input(w, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(w, **kwargs)


def test_dequantize_with_another_tensors_state_is_refused():
    packed, _ = quantize_4bit(_weight((8, 64)))
    _, other = quantize_4bit(_weight((16, 64)))
    with pytest.raises(ValueError, match="another tensor"):
        dequantize_4bit(packed, other)
    with pytest.raises(ValueError, match="absmax values do not fit"):
        QuantState(other.absmax, (8, 64), torch.float32, 64, "nf4", other.code)


def test_absmax_quantize_rejects_bad_bits_and_integers():
    with pytest.raises(ValueError, match=r"integer in \[2, 8\]"):
        quant.absmax_quantize(torch.ones(3), bits=9)
    with pytest.raises(ValueError, match="floating-point"):
        quant.absmax_quantize(torch.ones(3, dtype=torch.long))


# --- Linear4bit ------------------------------------------------------------------------


def _layer(dq=False, bias=True, out_features=48, in_features=96, quant_type="nf4"):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=dq)


@pytest.mark.parametrize("dq,bias,quant_type", [(False, True, "nf4"), (True, False, "fp4")])
def test_linear4bit_forward_and_input_grad_match_the_dequantized_weight(dq, bias, quant_type):
    linear, layer = _layer(dq, bias, quant_type=quant_type)
    w = layer.dequantize()
    assert w.shape == (48, 96) and w.dtype == torch.float32
    packed, state = quantize_4bit(linear.weight.detach(), quant_type, double_quant=dq)
    assert torch.equal(w, dequantize_4bit(packed, state))
    x = torch.randn(5, 3, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    y_ref = F.linear(x_ref, w, layer.bias)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)


def test_linear4bit_is_frozen_and_stores_no_weight():
    linear, layer = _layer()
    assert not hasattr(layer, "weight")
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.bias, linear.bias)
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == 48 * 96 // 2
    assert layer.logical_numel() == 48 * 96 + 48
    assert (layer.in_features, layer.out_features) == (96, 48)
    text = repr(layer)
    assert "in_features=96" in text and "quant_type='nf4'" in text and "blocksize=64" in text


def _saved_for_backward(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_linear4bit_saves_packed_codes_not_the_weight_for_backward():
    _, layer = _layer(out_features=128, in_features=256)
    x = torch.randn(4, 256, requires_grad=True)
    weight_sized = lambda ts: [t for t in ts if t.is_floating_point() and t.numel() == 128 * 256]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    ours = _saved_for_backward(lambda: layer(x))
    plain = _saved_for_backward(lambda: F.linear(x, layer.dequantize(), layer.bias))
    assert weight_sized(ours) == [] and len(weight_sized(plain)) == 1
    assert any(t is layer.packed for t in ours)
    assert nbytes(ours) < nbytes(plain) / 4  # 0.5 + 4/64 bytes per weight instead of 4


def test_linear4bit_keeps_exact_scales_when_the_model_is_cast():
    _, layer = _layer(dq=True)
    w = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax2.dtype == torch.float32 and layer.code.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(), w)


def test_linear4bit_buffers_and_compute_dtype():
    linear = nn.Linear(64, 8)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16, double_quant=True)
    assert set(dict(layer.named_buffers())) == {
        "packed",
        "absmax",
        "code",
        "offset",
        "absmax2",
        "code2",
    }
    assert layer.dequantize().dtype == torch.bfloat16
    y = layer(torch.randn(2, 64))
    assert y.dtype == torch.float32 and y.shape == (2, 8)
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 63, 64, 65, 130, 4097])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_pair_table_decode_equals_nibble_by_nibble_decode(n, blocksize):
    """dequantize_4bit's fast path (a lookup per two bytes) against the readable one."""
    torch.manual_seed(n)
    w = torch.randn(n) * torch.rand(n) * 10
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize)
        absmax = state.dequantize_absmax()
        slow = quant.decode_blocks(unpack_4bit(packed, n), state.code, absmax, blocksize)
        fast = quant.decode_4bit(packed, state.code, absmax, blocksize, n)
        assert torch.equal(fast, slow)
        shifted = torch.cat([packed.new_zeros(1, 1), packed])[1:]  # a view at an odd offset
        assert shifted.storage_offset() == 1
        assert torch.equal(quant.decode_4bit(shifted, state.code, absmax, blocksize, n), slow)
