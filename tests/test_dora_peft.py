"""DoRALinear against PEFT's `use_dora=True`: same weights, same outputs, gradients and files.

Adapters use random B (init_lora_weights=False) and magnitudes perturbed away from their
initial norms, so every term of the DoRA forward is active. Random base weights have no
zero rows; the zero-row case, where PEFT gives NaN, is documented in its own test.
"""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.dora import DoRALinear
from lora_edu.experiments import MLP
from lora_edu.inject import (
    LoRAConfig,
    add_lora,
    lora_layers,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
)
from tests.peft_common import TARGETS, TOL, make_bases

WORST = {}  # largest relative difference per comparison, printed with `pytest -s`


@pytest.fixture(scope="module")
def bases():
    return make_bases()


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print("\nlargest relative difference vs PEFT:", {k: f"{v:.1e}" for k, v in WORST.items()})


def _out(model, kind):
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return model(torch.randn(6, 8, generator=g))
    return model(input_ids=torch.randint(0, 100, (2, 9), generator=g)).logits


def _rel(a, b, what=None):
    """max |a - b| / max |b|; a comparison with PEFT is recorded under `what`."""
    r = ((a - b).abs().max() / b.abs().max()).item()
    if what:
        WORST[what] = max(WORST.get(what, 0.0), r)
    return r


def _peft_layers(peft_model):
    inner = peft_model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _parts(layer, adapter):
    """A, B and m of one adapter, for either library."""
    m = layer.lora_magnitude_vector[adapter]
    m = getattr(m, "weight", m)  # PEFT: a module holding .weight; lora_edu: the parameter
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, m


@torch.no_grad()
def _copy_from_peft(peft_model, ours, adapter="default", seed=5):
    """Perturb PEFT's magnitudes (so m != ||W0 + s B A||), then give lora_edu A, B and m."""
    g = torch.Generator().manual_seed(seed)
    for name, layer in _peft_layers(peft_model).items():
        if adapter not in layer.lora_A:
            continue
        mine = ours.get_submodule(name)
        if adapter in layer.lora_magnitude_vector:
            theirs, mine = _parts(layer, adapter), _parts(mine, adapter)
            theirs[2].mul_(1 + 0.3 * torch.randn(theirs[2].shape, generator=g))
        else:  # a plain LoRA adapter
            theirs = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            mine = mine.lora_A[adapter].weight, mine.lora_B[adapter].weight
        for a, b in zip(mine, theirs):
            a.copy_(b)


def _both(base, **cfg):
    cfg = {"use_dora": True, "init_lora_weights": False, **cfg}
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    ours = add_lora(copy.deepcopy(base), LoRAConfig(**cfg))
    _copy_from_peft(peft_model, ours)
    return peft_model, ours


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_unmerged_and_merged_outputs_and_gradients_equal_peft(bases, kind):
    peft_model, ours = _both(bases[kind], r=4, lora_alpha=8, target_modules=TARGETS[kind])
    assert all(isinstance(m, DoRALinear) for _, m in lora_layers(ours))
    mine, theirs = _out(ours, kind), _out(peft_model, kind)
    assert _rel(mine, _out(bases[kind], kind)) > 1e-2  # the adapters do something
    assert _rel(mine, theirs, "unmerged") <= TOL
    mine.square().mean().backward()
    theirs.square().mean().backward()
    for name, layer in _peft_layers(peft_model).items():
        for a, b in zip(_parts(ours.get_submodule(name), "default"), _parts(layer, "default")):
            assert a.grad is not None and _rel(a.grad, b.grad, "gradients") <= 1e-5, name
    with torch.no_grad():
        merged = _out(merge_and_unload(ours), kind)
        assert _rel(merged, _out(peft_model.merge_and_unload(), kind), "merged") <= TOL


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_training_with_dropout_equals_peft_given_the_same_masks(bases, kind):
    """Same seed, same dropout calls in the same order and shapes, so the same masks.

    The check is sound only if the seed decides the masks: a different seed must change
    the output, and our train output must differ from eval (dropout really runs).
    """
    peft_model, ours = _both(bases[kind], r=4, lora_alpha=8, lora_dropout=0.3,
                             target_modules=TARGETS[kind])  # fmt: skip
    with torch.no_grad():
        evaluated = _out(ours.eval(), kind)
    peft_model.train(), ours.train()
    torch.manual_seed(11)
    mine = _out(ours, kind)
    torch.manual_seed(11)
    theirs = _out(peft_model, kind)
    torch.manual_seed(12)
    other_seed = _out(peft_model, kind)
    assert _rel(mine, evaluated) > 1e-3
    assert _rel(other_seed, theirs) > 1e-3
    assert _rel(mine, theirs, "train-mode dropout") <= TOL
    mine.square().mean().backward()
    theirs.square().mean().backward()
    for name, layer in _peft_layers(peft_model).items():
        for a, b in zip(_parts(ours.get_submodule(name), "default"), _parts(layer, "default")):
            assert _rel(a.grad, b.grad, "train-mode gradients") <= 1e-5, name


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@torch.no_grad()
def test_save_adapter_loads_in_peft_with_the_same_outputs(bases, kind, tmp_path):
    torch.manual_seed(3)
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=False,
                     use_dora=True)  # fmt: skip
    ours = add_lora(copy.deepcopy(bases[kind]), cfg)
    for _, layer in lora_layers(ours):
        layer.lora_magnitude_vector["default"].mul_(1.5)  # not the norms PEFT would start from
    save_adapter(ours, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(bases[kind]), str(tmp_path / "a"))
    assert _rel(_out(ours, kind), _out(peft_model, kind), "save_adapter -> PEFT") <= TOL
    merged, theirs = _out(merge_and_unload(ours), kind), _out(peft_model.merge_and_unload(), kind)
    assert _rel(merged, theirs, "save_adapter -> PEFT, merged") <= TOL


@pytest.mark.parametrize("kind", ["mlp", "llama"])
@torch.no_grad()
def test_peft_save_pretrained_loads_with_load_adapter(bases, kind, tmp_path):
    torch.manual_seed(4)
    cfg = LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=TARGETS[kind],
                     init_lora_weights=False, use_dora=True)  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(bases[kind]), cfg)
    for layer in _peft_layers(peft_model).values():
        layer.lora_magnitude_vector["default"].weight.mul_(0.7)
    peft_model.save_pretrained(str(tmp_path / "p"))
    ours = load_adapter(copy.deepcopy(bases[kind]), tmp_path / "p")
    assert sorted(_peft_layers(peft_model)) == sorted(n for n, _ in lora_layers(ours))
    assert _rel(_out(ours, kind), _out(peft_model, kind), "PEFT -> load_adapter") <= TOL
    merged, theirs = _out(merge_and_unload(ours), kind), _out(peft_model.merge_and_unload(), kind)
    assert _rel(merged, theirs, "PEFT -> load_adapter, merged") <= TOL


@torch.no_grad()
def test_dora_and_lora_adapters_active_together_equal_peft_merged_or_not(bases):
    """Each adapter works on what the ones before it produced, in both libraries."""
    cfg = dict(lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights=False)
    peft_model, ours = _both(bases["mlp"], r=4, **cfg)
    for name, r, use_dora in [("b", 2, False), ("c", 3, True)]:
        peft_model.add_adapter(name, LoraConfig(r=r, use_dora=use_dora, **cfg))
        add_lora(ours, LoRAConfig(r=r, use_dora=use_dora, **cfg), adapter_name=name)
        _copy_from_peft(peft_model, ours, name, seed=r)
    peft_model.base_model.set_adapter(["default", "b", "c"])
    set_adapter(ours, ["default", "b", "c"])
    theirs = _out(peft_model, "mlp")
    assert _rel(_out(ours, "mlp"), theirs, "mixed adapters") <= TOL
    merged = _out(merge_and_unload(ours), "mlp")
    assert _rel(merged, _out(peft_model.merge_and_unload(), "mlp"), "mixed adapters") <= TOL


@torch.no_grad()
def test_peft_gives_nan_for_a_zero_base_row_and_lora_edu_gives_the_bias():
    torch.manual_seed(0)
    base = MLP(d_in=8, d_hidden=16, d_out=4)
    base.fc1.weight[3] = 0.0  # with B = 0 (the default init), W0 + s B A has a zero row
    cfg = dict(r=2, target_modules=["fc1"], use_dora=True)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    ours = add_lora(copy.deepcopy(base), LoRAConfig(**cfg))
    x = torch.randn(5, 8)
    theirs, mine = peft_model.base_model.model.fc1(x), ours.fc1(x)  # (5, 16)
    assert torch.isnan(theirs[:, 3]).all() and not torch.isnan(theirs[:, :3]).any()
    assert torch.equal(mine[:, 3], base.fc1.bias[3].expand(5))  # the zero row gives its bias
    assert _rel(mine[:, :3], theirs[:, :3], "rows beside a zero row") <= TOL


def test_trainable_parameter_count_equals_peft(capsys, bases):
    cfg = dict(r=4, target_modules="all-linear", use_dora=True)
    get_peft_model(copy.deepcopy(bases["llama"]), LoraConfig(**cfg)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    print_trainable_parameters(add_lora(copy.deepcopy(bases["llama"]), LoRAConfig(**cfg)))
    assert capsys.readouterr().out == theirs
