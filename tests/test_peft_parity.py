"""lora_edu against PEFT (the reference): same weights, same outputs, files each reads.

PEFT and transformers are imported here only; lora_edu itself never imports them. Adapters
use random B (init_lora_weights=False), so the LoRA path is never trivially zero.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig, LlamaForCausalLM

from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.combine import add_weighted_adapter
from lora_edu.inject import (
    LoRAConfig,
    add_lora,
    lora_layers,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
)
from tests.peft_common import LLAMA, TARGETS, TOL, make_bases


@pytest.fixture(scope="module")
def bases():
    return make_bases()


def _inputs(kind):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(6, 8, generator=g)
        if kind == "mlp"
        else torch.randint(0, 100, (2, 9), generator=g)
    )


@torch.no_grad()
def _out(model, kind):
    x = _inputs(kind)
    return model(x) if kind == "mlp" else model(input_ids=x).logits


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _peft_layers(peft_model):
    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _copy_from_peft(peft_model, ours, adapter="default"):
    with torch.no_grad():
        for name, layer in _peft_layers(peft_model).items():
            if adapter in layer.lora_A:
                ours.get_submodule(name).lora_A[adapter].weight.copy_(layer.lora_A[adapter].weight)
                ours.get_submodule(name).lora_B[adapter].weight.copy_(layer.lora_B[adapter].weight)


def _both(base, **cfg):
    """PEFT and lora_edu on copies of `base`, same config, lora_edu given PEFT's random weights."""
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))
    ours = add_lora(copy.deepcopy(base), LoRAConfig(init_lora_weights=False, **cfg))
    _copy_from_peft(peft_model, ours)
    return peft_model, ours


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@pytest.mark.parametrize("r, lora_alpha, use_rslora", [(4, 8, False), (8, 16, True), (2, 1, False)])
def test_same_weights_give_the_same_outputs_as_peft(bases, kind, r, lora_alpha, use_rslora):
    peft_model, ours = _both(bases[kind], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora,
                             target_modules=TARGETS[kind])  # fmt: skip
    assert _rel(_out(ours, kind), _out(bases[kind], kind)) > 1e-3  # the adapters do something
    assert _rel(_out(ours, kind), _out(peft_model, kind)) <= TOL


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], ["self_attn.k_proj", "nonexistent"], ["model.layers.1.mlp.down_proj"],
     r".*\.(q|v)_proj", r"model\.layers\.0\..*_proj", ["lm_head", "o_proj"], "all-linear"],
)  # fmt: skip
def test_targets_select_the_same_modules_as_peft(bases, targets):
    peft_model = get_peft_model(copy.deepcopy(bases["llama"]), LoraConfig(target_modules=targets))
    ours = add_lora(copy.deepcopy(bases["llama"]), LoRAConfig(target_modules=targets))
    assert sorted(_peft_layers(peft_model)) == sorted(n for n, _ in lora_layers(ours))


def test_all_linear_on_a_custom_module_selects_the_same_modules_as_peft(bases):
    peft_model, ours = _both(bases["mlp"], target_modules="all-linear")
    assert sorted(_peft_layers(peft_model)) == sorted(n for n, _ in lora_layers(ours))


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_save_adapter_loads_in_peft_with_the_same_outputs_and_merges_alike(bases, kind, tmp_path):
    torch.manual_seed(3)
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=False)
    ours = add_lora(copy.deepcopy(bases[kind]), cfg)
    save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bases[kind]), str(tmp_path / "a"))
    assert _rel(_out(ours, kind), _out(peft_model, kind)) <= TOL
    assert not any(p.requires_grad for p in peft_model.parameters())
    merged_peft, merged_ours = peft_model.merge_and_unload(), merge_and_unload(ours)
    assert _rel(_out(merged_ours, kind), _out(merged_peft, kind)) <= TOL


@pytest.mark.parametrize("kind, targets", [("mlp", ["fc1", "fc3"]), ("llama", "all-linear")])
def test_peft_save_pretrained_loads_with_load_adapter(bases, kind, targets, tmp_path):
    torch.manual_seed(4)
    peft_model = get_peft_model(copy.deepcopy(bases[kind]),
                                LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=targets,
                                           init_lora_weights=False))  # fmt: skip
    peft_model.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(bases[kind]), tmp_path / "p")
    assert sorted(_peft_layers(peft_model)) == sorted(n for n, _ in lora_layers(ours))
    assert _rel(_out(ours, kind), _out(peft_model, kind)) <= TOL
    merged_peft, merged_ours = peft_model.merge_and_unload(), merge_and_unload(ours)
    assert _rel(_out(merged_ours, kind), _out(merged_peft, kind)) <= TOL


@pytest.mark.parametrize(
    "combination_type, r2, use_rslora", [("cat", 6, False), ("linear", 4, False), ("cat", 2, True)]
)
def test_add_weighted_adapter_matches_peft(bases, combination_type, r2, use_rslora):
    first = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=use_rslora)
    second = dict(r=r2, lora_alpha=3, target_modules=["q_proj", "o_proj"])
    peft_model, ours = _both(bases["llama"], **first)
    peft_model.add_adapter("b", LoraConfig(init_lora_weights=False, **second))
    add_lora(ours, LoRAConfig(init_lora_weights=False, **second), adapter_name="b")
    _copy_from_peft(peft_model, ours, "b")
    weights = [0.7, -0.4]
    peft_model.add_weighted_adapter(
        ["default", "b"], weights, "mix", combination_type=combination_type
    )
    add_weighted_adapter(ours, ["default", "b"], weights, "mix", combination_type=combination_type)
    theirs = {n: m for n, m in _peft_layers(peft_model).items() if "mix" in m.lora_A}
    mine = {n: m for n, m in lora_layers(ours) if "mix" in m.lora_A}
    assert sorted(theirs) == sorted(mine) and len(mine) == 6
    for name, layer in theirs.items():
        assert mine[name].scaling["mix"] == pytest.approx(layer.scaling["mix"])
        for part in ("lora_A", "lora_B"):
            a, b = getattr(mine[name], part)["mix"].weight, getattr(layer, part)["mix"].weight
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (name, part)
    peft_model.set_adapter("mix")
    set_adapter(ours, "mix")
    assert _rel(_out(ours, "llama"), _out(peft_model, "llama")) <= TOL


@pytest.mark.parametrize("tie", [False, True])
def test_print_trainable_parameters_line_equals_peft(capsys, tie):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**LLAMA, tie_word_embeddings=tie))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    peft_model.print_trainable_parameters()
    theirs = capsys.readouterr().out
    print_trainable_parameters(add_lora(base, LoRAConfig(r=4, target_modules="all-linear")))
    assert capsys.readouterr().out == theirs and theirs.startswith("trainable params: ")


def test_llama_7b_shape_on_meta_has_peft_s_famous_count(capsys):
    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
        )  # fmt: skip
    add_lora(model, LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]))
    print_trainable_parameters(model)
    line = "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622\n"
    assert capsys.readouterr().out == line
