"""lora_edu.lora and lora_edu.scaling: the LoRA layer, one behaviour per test."""

import math

import pytest
import torch
from torch import nn

from lora_edu.lora import LoRALinear, base_weight
from lora_edu.scaling import lora_scaling


def _layer(d_in=12, d_out=7, seed=0, **kw):
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(d_in, d_out), **kw)


def _x(d_in=12, n=5, seed=1):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


class FakeQuantLinear(nn.Module):
    """A stand-in for a 4-bit layer: int8 codes and a scale, no float `.weight`."""

    def __init__(self, w):
        super().__init__()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.scale = w.abs().max() / 127
        self.register_buffer("codes", torch.round(w / self.scale).to(torch.int8))

    def dequantize(self):
        return self.codes.float() * self.scale

    def forward(self, x):
        return x @ self.dequantize().T


def test_scaling_is_alpha_over_r_and_alpha_over_sqrt_r_for_rslora():
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
    assert lora_scaling(1, 3) == pytest.approx(1 / 3)
    assert _layer(r=4, lora_alpha=8).scaling["default"] == 2.0
    assert _layer(r=4, lora_alpha=8, use_rslora=True).scaling["default"] == 4.0


@pytest.mark.parametrize(
    "alpha, r, message",
    [(8, 0, "positive integer"), (8, -2, "positive integer"), (8, 2.0, "positive integer"),
     (8, True, "positive integer"), (0, 8, "> 0"), (-1, 8, "> 0"), (math.nan, 8, "finite")],
)  # fmt: skip
def test_lora_scaling_rejects_bad_r_and_alpha_saying_what_is_allowed(alpha, r, message):
    with pytest.raises(ValueError, match=message):
        lora_scaling(alpha, r)


def test_zero_B_gives_base_output_exactly():
    layer, x = _layer(), _x()
    assert torch.equal(layer(x), layer.base_layer(x))


def test_default_init_is_kaiming_uniform_A_and_zero_B():
    layer = _layer(d_in=400, d_out=9, r=64)
    a = layer.lora_A["default"].weight  # (r, in)
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_gaussian_init_has_std_one_over_r_and_zero_B():
    layer = _layer(d_in=500, r=16, init_lora_weights="gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_init_false_gives_random_B_so_output_differs_from_base():
    layer, x = _layer(init_lora_weights=False), _x()
    assert torch.count_nonzero(layer.lora_B["default"].weight) > 0
    assert not torch.allclose(layer(x), layer.base_layer(x))


def test_A_gets_zero_grad_and_B_nonzero_grad_at_step_0_base_none():
    layer = _layer()
    layer(_x()).square().sum().backward()
    assert torch.count_nonzero(layer.lora_A["default"].weight.grad) == 0  # dL/dA = s B^T ... = 0
    assert torch.count_nonzero(layer.lora_B["default"].weight.grad) > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_forward_is_base_plus_scaled_B_A_x():
    layer, x = _layer(r=3, lora_alpha=5, init_lora_weights=False), _x()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + (5 / 3) * (x @ a.T @ b.T)
    assert _rel(layer(x), expected) < 1e-6


def test_forward_never_builds_delta_weight(monkeypatch):
    layer, x = _layer(init_lora_weights=False), _x()
    monkeypatch.setattr(LoRALinear, "delta_weight", lambda *a, **k: pytest.fail("built Delta W"))
    layer(x)


def test_delta_weight_is_scaling_times_B_at_A_with_shape_out_by_in():
    layer = _layer(d_in=12, d_out=7, r=3, lora_alpha=6, init_lora_weights=False)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.delta_weight().shape == (7, 12)
    assert torch.allclose(layer.delta_weight(), 2.0 * b @ a)


def test_merge_then_unmerge_restores_base_weight():
    layer = _layer(init_lora_weights=False)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and not torch.allclose(layer.base_layer.weight, w0)
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_merged_output_equals_unmerged_output():
    layer, x = _layer(init_lora_weights=False, lora_alpha=16), _x()
    before = layer(x)
    layer.merge()
    assert _rel(layer(x), before) < 1e-5


def test_merging_twice_raises_a_clear_error():
    layer = _layer()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


def test_quantized_base_uses_dequantize_for_forward_and_refuses_merge():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    layer, x = LoRALinear(FakeQuantLinear(w), r=2, init_lora_weights=False), _x(10)
    assert torch.equal(base_weight(layer.base_layer), layer.base_layer.dequantize())
    expected = x @ (base_weight(layer.base_layer) + layer.delta_weight()).T  # (5, 6)
    assert _rel(layer(x), expected) < 1e-5
    with pytest.raises(TypeError, match="[Dd]equantize it first"):
        layer.merge()


def test_dropout_only_touches_the_adapter_input():
    layer, x = _layer(lora_dropout=0.5, init_lora_weights=False), _x()
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    x_dropped = nn.functional.dropout(x, 0.5, training=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + layer.scaling["default"] * (x_dropped @ a.T @ b.T)
    assert _rel(out, expected) < 1e-6
    nn.init.zeros_(layer.lora_B["default"].weight)  # no adapter: the base path is never dropped
    assert torch.equal(layer(x), layer.base_layer(x))


def test_zero_dropout_is_identity():
    assert isinstance(_layer().lora_dropout["default"], nn.Identity)
    assert isinstance(_layer(lora_dropout=0.1).lora_dropout["default"], nn.Dropout)


def test_bf16_base_with_fp32_adapter_gives_bf16_output_close_to_fp32():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    ref = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(8, 64)
    expected = ref(x)
    low = LoRALinear(nn.Linear(64, 32).to(torch.bfloat16), r=4, lora_alpha=8)
    low.base_layer.load_state_dict(base.state_dict())
    low.lora_A.load_state_dict(ref.lora_A.state_dict())
    low.lora_B.load_state_dict(ref.lora_B.state_dict())
    assert low.lora_A["default"].weight.dtype == torch.float32  # PEFT keeps adapters in fp32
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert _rel(out.float(), expected) < 2e-2


def test_multiple_active_adapters_add_up():
    layer, x = _layer(init_lora_weights=False), _x()
    layer.update_layer("other", r=2, lora_alpha=4, init_lora_weights=False)
    base = layer.base_layer(x)
    one = layer(x) - base
    layer.set_adapter("other")
    two = layer(x) - base
    layer.set_adapter(["default", "other"])
    assert _rel(layer(x) - base, one + two) < 1e-5
    assert (
        layer.lora_A["other"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    )


def test_set_adapter_freezes_inactive_adapters():
    layer = _layer()
    layer.update_layer("other", r=2, lora_alpha=4)
    layer.set_adapter("other")
    assert not layer.lora_A["default"].weight.requires_grad
    assert layer.lora_B["other"].weight.requires_grad


def test_disable_adapters_gives_base_output_and_refuses_when_merged():
    layer, x = _layer(init_lora_weights=False), _x()
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.merge()
    layer.disable_adapters = True
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


def test_merged_layer_still_adds_active_adapters_that_are_not_merged():
    layer, x = _layer(init_lora_weights=False), _x()
    layer.update_layer("other", r=2, lora_alpha=4, init_lora_weights=False)
    layer.set_adapter(["default", "other"])
    before = layer(x)
    layer.merge(["default"])
    assert _rel(layer(x), before) < 1e-5


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda layer: layer.set_adapter("nope"), ValueError, r"unknown adapter.*\['default'\]"),
        (lambda layer: layer.update_layer("default", 4, 4), ValueError, "already has an adapter"),
        (lambda layer: layer.update_layer("a.b", 4, 4), ValueError, "without '.'"),
        (lambda layer: layer.update_layer("new", 0, 4), ValueError, "positive integer"),
        (lambda layer: layer.update_layer("new", 4, 4, lora_dropout=1.0), ValueError, r"\[0, 1\)"),
        (
            lambda layer: layer.update_layer("new", 4, 4, init_lora_weights="pissa"),
            ValueError,
            "gaussian",
        ),
        (lambda layer: layer.delta_weight("nope"), ValueError, "unknown adapter"),
        (lambda layer: layer.merge(["nope"]), ValueError, "unknown adapter"),
    ],
)
def test_errors_name_the_problem(call, error, message):
    with pytest.raises(error, match=message):
        call(_layer())


def test_wrapping_a_non_linear_module_raises():
    with pytest.raises(TypeError, match="LayerNorm"):
        LoRALinear(nn.LayerNorm(4))
