"""lora_edu.widgets.quantization_explorer: levels, errors, and a demo that reacts to its controls."""

import pytest
import torch

from lora_edu import quant
from lora_edu.widgets import quantization_error, quantization_explorer, quantization_levels


def _normal(shape=(64, 128), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_levels_are_sorted_span_minus_one_to_one_and_hold_zero():
    for quant_type, count in [("int4", 15), ("fp4", 16), ("nf4", 16)]:
        levels = quantization_levels(quant_type)
        assert levels.numel() == count
        assert torch.all(levels[1:] >= levels[:-1])
        assert levels[0] == -1
        assert levels.abs().max() == 1 and (levels == 0).any()
    assert torch.equal(quantization_levels("nf4"), quant.nf4_codebook())


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantization_levels("int8")
    with pytest.raises(ValueError, match="quant_type must be one of"):
        quantization_error(_normal(), "int8", 64)


def test_error_matches_the_package_round_trip():
    w = _normal()
    packed, state = quant.quantize_4bit(w, "nf4", 64)
    expected = ((w - quant.dequantize_4bit(packed, state)).norm() / w.norm()) ** 2
    scaled, rel = quantization_error(w, "nf4", 64)
    assert rel == pytest.approx(expected.item(), rel=1e-5)
    assert scaled.shape == (w.numel(),) and scaled.abs().max() == 1
    q, scales = quant.quantize_blockwise_absmax(w, 64, bits=4)
    w_hat = quant.dequantize_blockwise_absmax(q, scales, 64)
    expected = ((w - w_hat).norm() / w.norm()) ** 2
    assert quantization_error(w, "int4", 64)[1] == pytest.approx(expected.item(), rel=1e-5)


def test_nf4_beats_int4_on_normal_weights_and_small_blocks_beat_large_ones():
    w = _normal((256, 256))
    err = {t: quantization_error(w, t, 64)[1] for t in ["int4", "fp4", "nf4"]}
    assert err["nf4"] < err["int4"] and err["nf4"] < err["fp4"]
    assert quantization_error(w, "nf4", 64)[1] < quantization_error(w, "nf4", 4096)[1]


def test_explorer_redraws_on_both_controls_and_stores_one_stable_line():
    demo = quantization_explorer(_normal((64, 64)))
    size, kind, caption, picture = demo.children
    first = bytes(picture.value)
    assert first.startswith(b"\x89PNG")
    assert caption.value.startswith("NF4, blocksize 64: relative error ")
    assert caption.value.endswith("4.5 bits per parameter")
    size.value = 256
    assert caption.value.startswith("NF4, blocksize 256:") and bytes(picture.value) != first
    assert caption.value.endswith("4.12 bits per parameter")
    kind.value = "int4"
    assert caption.value.startswith("int4 absmax, blocksize 256:")
    rel = quantization_error(_normal((64, 64)), "int4", 256)[1]
    assert f"relative error {rel:.3g}," in caption.value
    assert repr(demo) == (
        "quantization explorer for 4,096 weights (pick a blocksize and a type) [interactive widget]"
    )


def test_explorer_has_a_default_weight():
    demo = quantization_explorer()
    assert repr(demo).startswith("quantization explorer for 65,536 weights")
