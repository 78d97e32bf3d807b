"""lora_edu.dora: the DoRA layer, one behaviour per test (PEFT comparisons: test_dora_peft.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.combine import add_weighted_adapter
from lora_edu.dora import DoRALinear, dora_weight, magnitude_scale, saved_bytes
from lora_edu.experiments import MLP
from lora_edu.inject import (
    LoRAConfig,
    add_lora,
    count_parameters,
    lora_layers,
    merge_and_unload,
)
from lora_edu.lora import LoRALinear, base_weight
from lora_edu.quant import Linear4bit


def _layer(d_in=12, d_out=7, seed=0, perturb=True, **kw):
    """A DoRA layer with random B and (by default) m moved away from ||W0 + s B A||."""
    torch.manual_seed(seed)
    kw = {"r": 3, "lora_alpha": 6, "init_lora_weights": False, **kw}
    layer = DoRALinear(nn.Linear(d_in, d_out), **kw)
    if perturb:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].mul_(1 + 0.3 * torch.randn(d_out))
    return layer


def _x(d_in=12, n=5, seed=1):
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _parts(layer, name="default"):
    return (layer.lora_magnitude_vector[name], layer.lora_A[name].weight, layer.lora_B[name].weight)


def _by_hand(layer, x, detach_norm=True):
    """The DoRA layer as one weight matrix, m * V / ||V||, built whole by autograd."""
    m, a, b = _parts(layer)
    w = dora_weight(layer.base_layer.weight, layer.scaling["default"] * b @ a, m, detach_norm)
    return F.linear(x, w, layer.base_layer.bias)  # (n, out)


def test_magnitude_starts_at_the_row_norms_of_W0_and_output_equals_base():
    layer, x = _layer(init_lora_weights=True, perturb=False), _x()
    norms = torch.linalg.norm(layer.base_layer.weight, dim=1)  # one per output feature (row)
    assert layer.lora_magnitude_vector["default"].shape == (7,)
    assert torch.equal(layer.lora_magnitude_vector["default"].detach(), norms)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_equals_the_dora_weight_m_times_V_over_its_row_norm():
    layer, x = _layer(), _x()
    assert _rel(layer(x), _by_hand(layer, x)) < 1e-5
    assert _rel(layer(x), layer.base_layer(x)) > 1e-2


def test_training_with_dropout_feeds_the_same_dropped_input_to_the_base_term():
    """PEFT's rule: in training with dropout, (m/||V|| - 1) multiplies W0 @ dropout(x)."""
    layer, x = _layer(lora_dropout=0.5), _x()
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)  # the mask the layer drew
    m, a, b = _parts(layer)
    w0 = layer.base_layer.weight
    scale = m / torch.linalg.norm(w0 + layer.scaling["default"] * b @ a, dim=1)  # (out,)
    lora = layer.scaling["default"] * xd @ a.T @ b.T  # (n, out)
    expected = layer.base_layer(x) + (scale - 1) * (xd @ w0.T) + scale * lora
    assert _rel(out, expected) < 1e-5
    layer.eval()
    assert _rel(layer(x), _by_hand(layer, x)) < 1e-5  # no dropout in eval


def test_gradients_reach_m_A_B_but_not_through_the_norm():
    layer, x = _layer(), _x()
    layer(x).square().sum().backward()
    assert layer.base_layer.weight.grad is None
    ours = [p.grad.clone() for p in _parts(layer)]
    assert all(g.abs().sum() > 0 for g in ours)
    for detach, same in [(True, True), (False, False)]:
        for p in _parts(layer):
            p.grad = None
        _by_hand(layer, x, detach_norm=detach).square().sum().backward()
        for name, g, p in zip("mAB", ours, _parts(layer)):
            # m's gradient is V x / ||V|| either way; A and B see the norm's gradient or not.
            assert (_rel(g, p.grad) < 1e-5) == (same or name == "m"), (detach, name)


def test_detach_norm_false_gives_the_gradient_through_the_norm():
    layer, x = _layer(), _x()
    layer.detach_norm = False
    layer(x).square().sum().backward()
    ours = [p.grad.clone() for p in _parts(layer)]
    for p in _parts(layer):
        p.grad = None
    _by_hand(layer, x, detach_norm=False).square().sum().backward()
    assert all(_rel(g, p.grad) < 1e-5 for g, p in zip(ours, _parts(layer)))


def test_detaching_the_norm_saves_an_out_by_in_activation():
    """What Sec. 4.3 saves: without the detach, autograd keeps W0 + s B A for the norm."""
    torch.manual_seed(0)
    layer, x = DoRALinear(nn.Linear(256, 512), r=8, init_lora_weights=False), torch.randn(4, 256)
    detached = saved_bytes(lambda: layer(x), exclude=layer)
    layer.detach_norm = False
    attached = saved_bytes(lambda: layer(x), exclude=layer)
    print(f"\nsaved for backward, d 256 -> 512, 4 tokens: detached {detached:,d} B, "
          f"not detached {attached:,d} B, saved {attached - detached:,d} B")  # fmt: skip
    assert attached - detached >= 512 * 256 * 4  # one float32 (out, in) matrix at least
    assert detached < 512 * 256 * 4


def test_merged_output_equals_unmerged_and_unmerge_restores_W0():
    layer, x = _layer(), _x()
    w0, before = layer.base_layer.weight.detach().clone(), layer(x)
    layer.merge()
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert _rel(layer(x), before) < 1e-5
    layer.unmerge()
    assert not layer.merged and torch.allclose(layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    assert _rel(layer(x), before) < 1e-5


def test_merged_weight_is_m_times_V_over_its_row_norm():
    layer = _layer()
    m, a, b = (p.detach() for p in _parts(layer))
    v = layer.base_layer.weight.detach() + layer.scaling["default"] * b @ a  # (out, in)
    layer.merge()
    expected = m[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)
    assert _rel(layer.base_layer.weight, expected) < 1e-6


def _zero_row_layer(magnitude=None):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    with torch.no_grad():
        base.weight[2] = 0.0
    layer = DoRALinear(base, r=2)  # default init: B = 0, so row 2 of W0 + s B A is zero
    if magnitude is not None:
        with torch.no_grad():
            layer.lora_magnitude_vector["default"][2] = magnitude
    return layer


@pytest.mark.parametrize("magnitude", [None, 0.7])  # m = ||W0 row|| = 0 as initialised, or not
def test_a_zero_norm_row_gives_its_bias_finite_gradients_and_a_zero_merged_row(magnitude):
    layer, x = _zero_row_layer(magnitude), _x(6)
    out = layer(x)
    assert torch.isfinite(out).all() and torch.equal(out[:, 2], layer.base_layer.bias[2].expand(5))
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in _parts(layer))
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.isfinite(layer.base_layer.weight).all()
    assert torch.equal(layer.base_layer.weight[2], torch.zeros(6))
    assert _rel(layer(x), out) < 1e-6
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_zero_norm_policy_leaves_every_nonzero_row_exactly_as_plain_division():
    m, norm = torch.tensor([1.5, 0.0, 0.0, 2.0]), torch.tensor([3.0, 0.0, 1e-30, 0.5])
    assert magnitude_scale(m, norm).tolist() == [0.5, 0.0, 0.0, 4.0]
    layer, x = _zero_row_layer(), _x(6)
    assert torch.isnan(layer.lora_magnitude_vector["default"] / layer.weight_norm()).any()  # PEFT's
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # now row 2 has the direction of s B A
        assert _rel(layer(x), _by_hand(layer, x)) < 1e-5


def test_merge_with_m_zero_on_a_nonzero_row_still_unmerges_exactly():
    layer = _layer()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][1] = 0.0
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight[1], torch.zeros(12))
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6, rtol=0)


def test_4bit_base_runs_forward_and_backward_and_refuses_merge():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 32))
    layer, x = DoRALinear(q, r=4, init_lora_weights=False), _x(64)
    dense = DoRALinear(nn.Linear(64, 32), r=4)  # the same layer on the dequantized weight
    with torch.no_grad():
        dense.base_layer.weight.copy_(base_weight(q))
        dense.base_layer.bias.copy_(q.bias)
    dense.load_state_dict(layer.state_dict(), strict=False)
    out = layer(x)
    assert _rel(out, dense(x)) < 1e-5
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in _parts(layer))
    with pytest.raises(TypeError, match="[Dd]equantize it first"):
        layer.merge()


def test_add_lora_with_use_dora_counts_the_magnitude_and_merges_and_unloads():
    torch.manual_seed(0)
    model, x = MLP(d_in=8, d_hidden=16, d_out=4), _x(8)
    add_lora(model, LoRAConfig(r=2, target_modules=["fc1", "fc3"], use_dora=True))
    assert all(isinstance(m, DoRALinear) for _, m in lora_layers(model))
    per_layer = [2 * (8 + 16) + 16, 2 * (16 + 4) + 4]  # r (in + out) + out
    assert count_parameters(model)["trainable"] == sum(per_layer)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_()
            layer.lora_magnitude_vector["default"].mul_(1.3)
        before = model(x)
        plain = merge_and_unload(model)
        assert type(plain.fc1) is nn.Linear and _rel(plain(x), before) < 1e-5


def test_a_second_dora_adapter_is_trainable_alone_and_plain_lora_cannot_take_dora():
    torch.manual_seed(0)
    model = add_lora(MLP(8, 16, 4), LoRAConfig(r=2, target_modules=["fc1"], use_dora=True))
    add_lora(model, LoRAConfig(r=2, target_modules=["fc1"], use_dora=True), adapter_name="b")
    assert not model.fc1.lora_magnitude_vector["default"].requires_grad
    assert model.fc1.lora_magnitude_vector["b"].requires_grad
    plain = add_lora(MLP(8, 16, 4), LoRAConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="plain LoRALinear"):
        add_lora(plain, LoRAConfig(r=2, target_modules=["fc1"], use_dora=True), adapter_name="d")
    assert type(plain.fc1) is LoRALinear and list(plain.lora_configs) == ["default"]
    with pytest.raises(ValueError, match="not DoRA"):
        add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "mix")


def test_a_merged_layer_refuses_an_unmerged_dora_adapter_in_forward():
    layer, x = _layer(), _x()
    layer.update_layer("b", 2, 4, init_lora_weights=False, use_dora=True)
    layer.set_adapter(["default", "b"])
    layer.merge(["default"])
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)


def test_save_and_load_round_trip_the_magnitude_under_peft_key(tmp_path):
    torch.manual_seed(0)
    base, x = MLP(8, 16, 4), _x(8)
    cfg = LoRAConfig(r=2, target_modules=["fc1"], use_dora=True, init_lora_weights=False)
    model = add_lora(copy.deepcopy(base), cfg)
    with torch.no_grad():
        model.fc1.lora_magnitude_vector["default"].mul_(1.2)
    save_adapter(model, tmp_path / "a")
    assert torch.equal(load_adapter(copy.deepcopy(base), tmp_path / "a")(x), model(x))
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    assert tensors["base_model.model.fc1.lora_magnitude_vector"].shape == (16,)
    save_file({**tensors, "base_model.model.fc1.lora_magnitude_vector": torch.ones(15)}, path)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector has shape \(15,\)"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")
    del tensors["base_model.model.fc1.lora_magnitude_vector"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="lacks lora_A/lora_B weights or lora_magnitude_vector"):
        load_adapter(copy.deepcopy(base), tmp_path / "a")
