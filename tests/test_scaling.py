"""lora_edu.scaling: alpha / r and rsLoRA's alpha / sqrt(r), alone and through PEFT's files."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from test_peft_parity import LLAMA, TARGETS, _out, _peft_layers, _rel
from transformers import LlamaConfig, LlamaForCausalLM

from lora_edu import LoRAConfig, LoRALinear, add_lora, load_adapter, lora_scaling, save_adapter
from lora_edu.experiments import MLP
from lora_edu.inject import lora_layers

TOL = 1e-5  # relative, float32


@pytest.fixture(scope="module")
def bases():
    """The parity tests' two bases (test_peft_parity.py): a small MLP and transformers' LLaMA."""
    torch.manual_seed(0)
    return {"mlp": MLP(d_in=8, d_hidden=32, d_out=4),
            "llama": LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()}  # fmt: skip


def test_standard_and_rank_stabilized_scaling_formulas():
    assert lora_scaling(16, 4) == 4.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
    assert lora_scaling(8, 8) == 1.0  # alpha = r: s = 1, the common default
    assert lora_scaling(16, 64, rslora=True) == 2.0


@given(alpha=st.floats(0.01, 1e3), r=st.integers(1, 4096))
def test_rslora_is_sqrt_r_times_the_standard_scale(alpha, r):
    assert lora_scaling(alpha, r, rslora=True) == pytest.approx(
        math.sqrt(r) * lora_scaling(alpha, r)
    )


@pytest.mark.parametrize("r, alpha, rslora", [(1, 1, False), (8, 16, True), (64, 16, True)])
def test_layer_scaling_equals_peft_s(r, alpha, rslora):
    ours = LoRALinear(torch.nn.Linear(4, 4), r=r, lora_alpha=alpha, use_rslora=rslora)
    peft_model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(4, 4)),
        LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["0"]),
    )
    (theirs,) = _peft_layers(peft_model).values()
    assert ours.scaling["default"] == pytest.approx(theirs.scaling["default"], rel=1e-12)


@pytest.mark.parametrize("bad", [dict(alpha=16, r=0), dict(alpha=0, r=8), dict(alpha=16, r=2.5),
                                 dict(alpha=float("nan"), r=8), dict(alpha=True, r=8)])  # fmt: skip
def test_bad_alpha_or_rank_is_refused(bad):
    with pytest.raises(ValueError):
        lora_scaling(**bad)


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_rslora_adapter_saved_by_lora_edu_loads_in_peft_with_the_same_outputs(
    bases, kind, tmp_path
):
    torch.manual_seed(5)
    cfg = LoRAConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=TARGETS[kind],
                     init_lora_weights=False)  # fmt: skip
    ours = add_lora(copy.deepcopy(bases[kind]), cfg)
    save_adapter(ours, tmp_path / "rs")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bases[kind]), str(tmp_path / "rs"))
    assert all(layer.use_rslora["default"] for layer in _peft_layers(peft_model).values())
    assert _rel(_out(ours, kind), _out(peft_model, kind)) <= TOL
    assert _rel(_out(ours, kind), _out(bases[kind], kind)) > 1e-3  # the adapter does something


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_peft_rslora_adapter_loads_with_load_adapter_and_keeps_sqrt_r(bases, kind, tmp_path):
    torch.manual_seed(6)
    peft_model = get_peft_model(copy.deepcopy(bases[kind]),
                                LoraConfig(r=9, lora_alpha=6, use_rslora=True,
                                           target_modules=TARGETS[kind], init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(bases[kind]), tmp_path / "p")
    assert {layer.scaling["default"] for _, layer in lora_layers(ours)} == {6 / 3}
    assert _rel(_out(ours, kind), _out(peft_model, kind)) <= TOL


def test_ignoring_use_rslora_when_loading_changes_the_update_by_sqrt_r(bases, tmp_path):
    torch.manual_seed(7)
    cfg = LoRAConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["fc2"],
                     init_lora_weights=False)  # fmt: skip
    ours = add_lora(copy.deepcopy(bases["mlp"]), cfg)
    save_adapter(ours, tmp_path / "rs")
    wrong = load_adapter(copy.deepcopy(bases["mlp"]), tmp_path / "rs")
    for _, layer in lora_layers(wrong):  # an inference loader that applies alpha / r
        layer.scaling["default"] = lora_scaling(8, 16)
    (_, right_layer), (_, wrong_layer) = lora_layers(ours)[0], lora_layers(wrong)[0]
    ratio = right_layer.delta_weight().norm() / wrong_layer.delta_weight().norm()
    assert ratio.item() == pytest.approx(4.0, rel=1e-6)  # sqrt(16)


def _curves(alpha, optimizer, lr, ratio=1.0, steps=30):
    from lora_edu.experiments import LinearShiftTask
    from lora_edu.experiments.dynamics import lora_student, train_lora

    task = LinearShiftTask.decaying(24, 20, power=1.0, seed=0)
    layer = lora_student(task, r=4, alpha=alpha, seed=0)
    return torch.tensor(train_lora(layer, task, steps, lr, ratio, optimizer, eps=1e-16)["loss"])


@pytest.mark.parametrize("optimizer, lr, b_factor", [("adam", 3e-3, 3.0), ("sgd", 0.5, 9.0)])
def test_scaling_s_by_3_is_scaling_b_s_learning_rate_by_3_adam_or_9_sgd(optimizer, lr, b_factor):
    scaled = _curves(3 * 4, optimizer, lr)
    same = _curves(4, optimizer, lr, ratio=b_factor)
    assert ((scaled - same).abs() / scaled).max() < 1e-5
    every = _curves(4, optimizer, 3 * lr) if optimizer == "adam" else _curves(4, optimizer, lr, 3.0)
    assert ((scaled - every).abs() / scaled).max() > 1e-2  # the other knobs are different runs
