"""Properties of lora_edu.quant that hold for every input (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_edu import quant
from lora_edu.quant import dequantize_4bit, pack_4bit, quantize_4bit, unpack_4bit

FAST = settings(max_examples=30, deadline=None)
CODEBOOKS = {"nf4": quant.nf4_codebook, "fp4": quant.fp4_codebook}

quant_types = st.sampled_from(["nf4", "fp4"])
blocksizes = st.sampled_from([32, 64, 128])


@st.composite
def weights(draw, dtypes=(torch.float32,)):
    """A random tensor: normal values, a random scale, sometimes outliers and zeros."""
    n = draw(st.integers(1, 700))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-4, 0.02, 1.0, 300.0]))
    x = torch.randn(n, generator=g) * scale
    if draw(st.booleans()):
        x[torch.randint(n, (max(1, n // 50),), generator=g)] *= 40  # outliers
    if draw(st.booleans()):
        x[torch.rand(n, generator=g) < 0.2] = 0
    shape = draw(st.sampled_from([(n,), (1, n), (n, 1)]))
    return x.view(shape).to(draw(st.sampled_from(dtypes)))


@FAST
@given(weights(), quant_types, blocksizes)
def test_error_is_at_most_half_the_gap_of_its_bucket_times_absmax(w, quant_type, blocksize):
    packed, state = quantize_4bit(w, quant_type, blocksize)
    err = (dequantize_4bit(packed, state) - w).abs().reshape(-1)  # (n,)
    absmax = state.absmax.repeat_interleave(blocksize)[: w.numel()]  # (n,)
    code = CODEBOOKS[quant_type]().sort().values  # (16,)
    scaled = (w.reshape(-1) / absmax.clamp(min=1e-38)).clamp(-1, 1)
    upper = torch.bucketize(scaled, code).clamp(1, 15)  # code[upper - 1] <= scaled <= code[upper]
    half_gap = (code[upper] - code[upper - 1]) / 2
    assert torch.all(err <= half_gap * absmax * (1 + 1e-5) + 1e-30)
    assert torch.all(err <= (code[1:] - code[:-1]).max() / 2 * absmax * (1 + 1e-5) + 1e-30)


@FAST
@given(st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_round_trips(codes):
    codes = torch.tensor(codes)
    packed = pack_4bit(codes)
    assert packed.shape == ((len(codes) + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(unpack_4bit(packed, len(codes)), codes)


@FAST
@given(weights((torch.float32, torch.float16, torch.bfloat16)), quant_types, st.booleans())
def test_dequantize_restores_shape_and_dtype(w, quant_type, double_quant):
    packed, state = quantize_4bit(w, quant_type, 64, double_quant=double_quant)
    w_hat = dequantize_4bit(packed, state)
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert torch.isfinite(w_hat).all()


@FAST
@given(st.integers(1, 9), st.integers(0, 2**31 - 1), quant_types, blocksizes)
def test_exactly_representable_tensors_are_lossless(n_blocks, seed, quant_type, blocksize):
    g = torch.Generator().manual_seed(seed)
    code = CODEBOOKS[quant_type]()  # (16,)
    idx = torch.randint(16, (n_blocks, blocksize), generator=g)
    idx[:, 0] = int(code.abs().argmax())  # each block reaches |code| = 1, so absmax is exact
    absmax = torch.rand(n_blocks, 1, generator=g) * 10 + 1e-3  # (n_blocks, 1)
    w = code[idx] * absmax  # (n_blocks, blocksize)
    packed, state = quantize_4bit(w, quant_type, blocksize)
    assert torch.equal(dequantize_4bit(packed, state), w)
