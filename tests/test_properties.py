"""Properties that hold for every input (hypothesis): merge/unmerge, the 4-bit error bound with
double quantization and 16-bit outputs, packing, save/load, and B = 0.

Tolerances are derived, not tuned. With round to nearest and unit roundoff u = eps / 2 of a
dtype, a computed value v = fl(x) satisfies abs(v - x) <= u * abs(v) (plus half the smallest
subnormal, tiny * eps / 2, where v underflows). tests/test_quant_properties.py holds the
float32 bound without double quantization; the bound here adds the other two terms.
"""

import copy
import tempfile

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_quant_properties import CODEBOOKS, weights
from torch import nn

from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.dora import DoRALinear
from lora_edu.experiments import MLP
from lora_edu.inject import LoRAConfig, add_lora
from lora_edu.lora import LoRALinear
from lora_edu.quant import dequantize_4bit, dynamic_map, quantize_4bit
from lora_edu.quant_codebooks import pack_4bit, unpack_4bit

FAST = settings(max_examples=40, deadline=None)
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _u(dtype):
    """Unit roundoff of a dtype: half the gap between 1 and the next number."""
    return torch.finfo(dtype).eps / 2


def _underflow(dtype):
    """Half the smallest subnormal: the absolute rounding error where values underflow."""
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps / 2


# --- merge / unmerge ------------------------------------------------------------------------


@FAST
@given(
    d_out=st.integers(1, 24),
    d_in=st.integers(1, 24),
    r=st.integers(1, 30),  # up to beyond min(d_in, d_out): allowed, see test_numerics.py
    alpha=st.sampled_from([1e-3, 0.5, 1, 8, 16, 300.0]),
    rslora=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    seed=st.integers(0, 2**31 - 1),
)
def test_merge_then_unmerge_restores_the_base_weight(d_out, d_in, r, alpha, rslora, dtype, seed):
    """W1 = fl(W0 + D), W2 = fl(W1 - D), with D = Delta W in the base dtype, the same both times.

    Then W1 - D = W0 + e1 with abs(e1) <= u abs(W1), and abs(W2 - (W1 - D)) <= u abs(W2), so
    abs(W2 - W0) <= u (abs(W1) + abs(W2)) for the base dtype's u. The factor 1 + 2^-10 covers
    a 16-bit sum taken in float32 before its one rounding to 16 bits (double rounding).
    """
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
    layer = LoRALinear(base, r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=False)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(d_out, r, generator=g))
    w0 = base.weight.detach().clone()
    layer.merge()
    w1 = base.weight.detach().clone()
    layer.unmerge()
    w2 = base.weight.detach()
    assert w2.dtype == dtype and not layer.merged
    wide = [w.double() for w in (w0, w1, w2)]
    u, floor = _u(dtype) * (1 + 2**-10), 2 * _underflow(dtype)
    bound = u * (wide[1].abs() + wide[2].abs()) + floor
    assert torch.all((wide[2] - wide[0]).abs() <= bound)


# --- the 4-bit error bound ------------------------------------------------------------------


def _blocks(x, blocksize):
    """(n,) float32 values cut into blocks of `blocksize`: the per-element block absmax, (n,)."""
    flat = x.reshape(-1).float()
    pad = torch.nn.functional.pad(flat.abs(), (0, -flat.numel() % blocksize))
    return pad.view(-1, blocksize).amax(1).repeat_interleave(blocksize)[: flat.numel()]


def _half_gap(scaled, sorted_code):
    """Half the larger gap around each value in a sorted codebook: its worst rounding error."""
    upper = torch.bucketize(scaled, sorted_code).clamp(1, len(sorted_code) - 1)
    gap = sorted_code[upper] - sorted_code[upper - 1]  # the interval holding the value
    left = sorted_code[(upper - 1).clamp(min=1)] - sorted_code[(upper - 2).clamp(min=0)]
    right = sorted_code[(upper + 1).clamp(max=len(sorted_code) - 1)] - sorted_code[upper]
    return torch.maximum(gap, torch.maximum(left, right)) / 2  # a value on a code: either side


@FAST
@given(
    weights((torch.float32, torch.float16, torch.bfloat16)),
    st.sampled_from(["nf4", "fp4"]),
    st.sampled_from([32, 64, 128]),
    st.booleans(),
)
def test_4bit_error_with_double_quant_and_16bit_outputs_is_within_the_derived_bound(
    w, quant_type, blocksize, double_quant
):
    """abs(w_hat - w) <= g a + abs(a_hat - a) + u32 abs(w_hat32) + u_out abs(w_hat32) (+ floor).

    g: half the gap around w / a in the codebook (the float32 bound); a: the block's absmax
    from w itself; a_hat: the absmax dequantize uses. With double quantization a_hat - a is
    itself bounded: (a - mean) is coded in the 8-bit dynamic map against a second absmax a2,
    so abs(a_hat - a) <= g2 a2 + 4 u32 (abs(a) + abs(mean) + a2), g2 the half gap in that map.
    A 16-bit output adds one rounding of the float32 value.
    """
    assume(double_quant or w.dtype != torch.float32)  # that case: test_quant_properties.py
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant=double_quant)
    w_hat = dequantize_4bit(packed, state)
    assert w_hat.dtype == w.dtype and w_hat.shape == w.shape
    a = _blocks(w, blocksize).double()  # (n,) the true absmax of each element's block
    a_hat = state.dequantize_absmax().repeat_interleave(blocksize)[: w.numel()].double()
    x = w.reshape(-1).double()
    code = CODEBOOKS[quant_type]().sort().values.double()  # (16,)
    g = _half_gap((x / a.clamp(min=1e-38)).clamp(-1, 1), code)
    u32 = _u(torch.float32)
    a_err = torch.zeros_like(a)  # without double quantization a_hat is a, exactly
    if not double_quant:
        assert torch.equal(a_hat, a)
    else:
        blocks_a = a[::blocksize]  # (n_blocks,)
        mean = blocks_a.mean()  # what the offset stands for, here in float64
        a2 = _blocks(blocks_a - mean, 256).double()  # (n_blocks,) second-level absmax
        scaled2 = ((blocks_a - mean) / a2.clamp(min=1e-38)).clamp(-1, 1)
        g2 = _half_gap(scaled2, dynamic_map().double())
        a_bound = g2 * a2 + 4 * u32 * (blocks_a.abs() + mean.abs() + a2)
        assert torch.all((a_hat[::blocksize] - blocks_a).abs() <= a_bound)
        a_err = a_bound.repeat_interleave(blocksize)[: w.numel()]
    w32 = g * a + a_err + x.abs()  # a bound on abs(w_hat in float32)
    bound = g * a * (1 + 1e-6) + a_err + u32 * w32 + _underflow(torch.float32)
    if w.dtype != torch.float32:
        bound = bound + _u(w.dtype) * w32 + _underflow(w.dtype)
    assert torch.all((w_hat.reshape(-1).double() - x).abs() <= bound)


# --- packing --------------------------------------------------------------------------------


@FAST
@given(
    st.lists(st.integers(1, 5), min_size=1, max_size=3),
    st.sampled_from([torch.uint8, torch.int32, torch.int64]),
    st.integers(0, 2**31 - 1),
)
def test_unpack_of_pack_gives_the_codes_of_any_shape_and_integer_dtype(shape, dtype, seed):
    codes = torch.randint(16, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed = pack_4bit(codes)
    assert torch.equal(unpack_4bit(packed, codes.numel()), codes.reshape(-1).long())


@FAST
@given(st.binary(min_size=1, max_size=200))
def test_pack_of_unpack_gives_back_every_byte(data):
    packed = torch.tensor(list(data), dtype=torch.uint8)[:, None]  # (m, 1), any bytes
    assert torch.equal(pack_4bit(unpack_4bit(packed, 2 * len(data))), packed)


# --- save / load ----------------------------------------------------------------------------

TARGETS = st.one_of(
    st.lists(st.sampled_from(["fc1", "fc2", "fc3"]), min_size=1, max_size=3, unique=True),
    st.sampled_from([r"fc[13]", "all-linear"]),
)


@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 20),
    lora_alpha=st.one_of(st.integers(1, 64), st.floats(1e-3, 1e3)),
    lora_dropout=st.sampled_from([0.0, 0.1, 0.5]),
    target_modules=TARGETS,
    use_rslora=st.booleans(),
    use_dora=st.booleans(),
    init_lora_weights=st.sampled_from([True, False, "gaussian"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_save_then_load_gives_the_same_config_and_outputs(seed, **config):
    torch.manual_seed(seed)
    base = MLP(d_in=8, d_hidden=12, d_out=4)
    model = add_lora(copy.deepcopy(base), LoRAConfig(**config))
    with torch.no_grad():  # trained-looking adapters: B and the magnitudes move off their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(3, 8)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, tmp + "/a")
        loaded = load_adapter(base, tmp + "/a")
    saved, read = (m.lora_configs["default"].to_peft_dict() for m in (model, loaded))
    assert read == saved  # the same config, a list of targets in sorted order
    assert torch.equal(loaded.eval()(x), model.eval()(x))


# --- B = 0 ----------------------------------------------------------------------------------


@FAST
@given(
    d_out=st.integers(1, 20),
    d_in=st.integers(1, 20),
    r=st.integers(1, 24),
    dtype=st.sampled_from(FLOATS),
    dora=st.booleans(),
    train=st.booleans(),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
    lead=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**31 - 1),
)
def test_with_b_zero_the_layer_is_its_base_for_any_input(
    d_out, d_in, r, dtype, dora, train, scale, lead, seed
):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    kind = DoRALinear if dora else LoRALinear
    layer = kind(base, r=r, lora_alpha=2 * r, lora_dropout=0.3).train(train)  # B = 0 at init
    x = (torch.randn(*lead, d_in) * scale).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and torch.equal(out, base(x))
