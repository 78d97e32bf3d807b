"""lora_edu.inject: LoRA inside a model (targets, freezing, counting, merging, named adapters)."""

import contextlib
import io

import pytest
import torch
from model_state import assert_unchanged, snapshot
from torch import nn

from lora_edu.combine import add_weighted_adapter
from lora_edu.inject import (
    LoRAConfig,
    add_lora,
    count_parameters,
    disable_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
)
from lora_edu.lora import LoRALinear


class Attention(nn.Module):
    def __init__(self, d=16, d_kv=8):  # grouped-query attention: k and v are narrower
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d_kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d_kv, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x):
        v = self.v_proj(x).repeat(1, 2)  # (batch, d)
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x).repeat(1, 2) + v)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.self_attn = Attention(d)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class TinyLM(nn.Module):
    """LLaMA's layer names; the head is called `out_head` to prove it is found by method."""

    def __init__(self, d=16, layers=2, with_head_method=True):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.my_q_proj = nn.Linear(d, d)  # ends with "q_proj" but not with ".q_proj"
        self.out_head = nn.Linear(d, 11)
        if not with_head_method:
            self.get_output_embeddings = None

    def get_output_embeddings(self):
        return self.out_head

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out_head(self.my_q_proj(x))


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def _x(seed=1):
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _cfg(targets, **kw):
    return LoRAConfig(target_modules=targets, **kw)


def test_list_entry_matches_exact_name_or_dot_suffix_only():
    model = add_lora(_model(), _cfg(["q_proj", "layers.1.mlp.up_proj", "out_head"]))
    assert _wrapped(model) == [
        "layers.0.self_attn.q_proj",
        "layers.1.mlp.up_proj",
        "layers.1.self_attn.q_proj",
        "out_head",
    ]  # fmt: skip  (my_q_proj does not end with ".q_proj")


def test_regex_must_match_the_whole_name():
    assert _wrapped(add_lora(_model(), _cfg(r".*\.(k|v)_proj"))) == [
        "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj",
        "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="matched no module"):
        add_lora(_model(), _cfg(r"layers\.0\.self_attn\.q_pro"))  # a prefix is not a full match


def test_all_linear_leaves_out_the_head_found_by_get_output_embeddings():
    names = _wrapped(add_lora(_model(), _cfg("all-linear")))
    assert "out_head" not in names and "my_q_proj" in names and len(names) == 13
    names = _wrapped(add_lora(_model(with_head_method=False), _cfg("all-linear")))
    assert "out_head" in names and len(names) == 14


def test_non_square_gqa_projections_get_adapters_of_their_own_shape():
    model = add_lora(_model(), _cfg(["k_proj", "v_proj"], r=4))
    k = model.layers[0].self_attn.k_proj
    assert k.lora_A["default"].weight.shape == (4, 16)
    assert k.lora_B["default"].weight.shape == (8, 4)
    assert k.delta_weight().shape == (8, 16)
    model(_x())


def test_no_match_error_lists_the_models_linear_layer_names():
    with pytest.raises(ValueError, match=r"14 linear layers .*'k_proj'.*'out_head'.*'up_proj'"):
        add_lora(_model(), _cfg(["qproj"]))


def test_targeting_a_non_linear_module_names_it_and_its_type():
    with pytest.raises(TypeError, match=r"'layers.0.norm' is a LayerNorm"):
        add_lora(_model(), _cfg(["norm"]))


def test_only_the_new_adapter_is_trainable():
    model = add_lora(_model(), _cfg(["q_proj", "v_proj"], r=2))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_a_second_adapter_becomes_active_and_is_the_only_trainable_one():
    model = add_lora(_model(), _cfg(["q_proj"], r=2))
    add_lora(model, _cfg(["q_proj", "o_proj"], r=4), adapter_name="second")
    q = model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"default", "second"} and q.active_adapters == ["second"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(".second." in n for n in trainable)


def test_count_parameters_counts_trainable_and_total_including_lora():
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    add_lora(model, _cfg(["q_proj"], r=2))
    lora = 2 * 2 * (16 + 16)  # two layers, r (in + out)
    assert count_parameters(model) == {
        "trainable": lora, "total": total + lora, "percent": 100 * lora / (total + lora)
    }  # fmt: skip


def test_count_parameters_counts_tied_weights_once_and_works_on_meta():
    with torch.device("meta"):
        model = _model()
    model.out_head.weight = nn.Parameter(torch.empty(11, 16, device="meta"))
    model.extra = nn.Linear(16, 11, bias=False, device="meta")
    model.extra.weight = model.out_head.weight  # tied
    total = count_parameters(model)["total"]
    assert total == sum(p.numel() for p in model.parameters())  # parameters() skips tied copies
    assert total < sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))
    add_lora(model, _cfg(["q_proj"], r=2))
    assert count_parameters(model)["total"] == total + 128


def test_count_parameters_uses_logical_numel_for_packed_modules():
    class Packed(nn.Module):  # two 4-bit weights per byte
        def __init__(self):
            super().__init__()
            self.packed = nn.Parameter(torch.zeros(50, dtype=torch.uint8), requires_grad=False)

        def logical_numel(self):
            return 100

    model = nn.Sequential(Packed(), nn.Linear(3, 2))
    assert count_parameters(model) == {"trainable": 8, "total": 108, "percent": 100 * 8 / 108}


def test_print_trainable_parameters_prints_peft_line():
    model = add_lora(_model(), _cfg(["q_proj"], r=2))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_trainable_parameters(model)
    c = count_parameters(model)
    expected = (
        f"trainable params: 128 || all params: {c['total']:,} || trainable%: {c['percent']:.4f}\n"
    )
    assert out.getvalue() == expected


@pytest.mark.parametrize(
    "config, adapter_name, error",
    [
        (_cfg(["norm"]), "new", TypeError),  # a LayerNorm target
        (_cfg(["q_proj", "norm"]), "new", TypeError),  # valid targets first, then a bad one
        (_cfg(["nothing"]), "new", ValueError),
        (_cfg(["q_proj"]), "a.b", ValueError),
        (_cfg(["q_proj"]), "default", ValueError),  # the name exists already
    ],
)
def test_a_failed_add_lora_leaves_the_model_unchanged(config, adapter_name, error):
    model = add_lora(_model(), _cfg(["v_proj"]))
    snap = snapshot(model)
    with pytest.raises(error):
        add_lora(model, config, adapter_name)
    assert_unchanged(model, snap)


def test_a_failed_first_add_lora_leaves_a_fresh_model_trainable():
    model = _model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="without '.'"):
        add_lora(model, _cfg(["q_proj"]), adapter_name="a.b")
    assert_unchanged(model, snap)
    assert all(p.requires_grad for p in model.parameters())


def test_merge_and_unload_gives_only_nn_linear_and_same_outputs():
    model, x = _model(), _x()
    add_lora(model, _cfg("all-linear", r=3, lora_alpha=6, init_lora_weights=False))
    add_lora(model, _cfg(["q_proj"], r=2, init_lora_weights=False), adapter_name="other")
    set_adapter(model, ["default", "other"])
    expected = model(x)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {type(m) for n, m in model.named_modules() if n.endswith("proj")} == {nn.Linear}
    assert not hasattr(model, "lora_configs")
    assert ((model(x) - expected).abs().max() / expected.abs().max()) < 1e-5


def test_unload_restores_the_base_model():
    model, x = _model(), _x()
    expected = model(x)
    add_lora(model, _cfg("all-linear", init_lora_weights=False))
    model.layers[0].self_attn.q_proj.merge()
    unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_set_adapter_switches_and_disable_adapter_gives_the_base():
    model, x = _model(), _x()
    base = model(x)
    add_lora(model, _cfg(["q_proj"], init_lora_weights=False))
    add_lora(model, _cfg(["v_proj"], init_lora_weights=False), adapter_name="b")
    out_b = model(x)
    set_adapter(model, "default")
    assert not torch.allclose(model(x), out_b)
    with disable_adapter(model):
        assert torch.equal(model(x), base)
    assert not torch.equal(model(x), base)
    with pytest.raises(ValueError, match=r"unknown adapter.*\['b', 'default'\]"):
        set_adapter(model, "c")


def _two_adapters(r2=3):
    model = _model()
    add_lora(model, _cfg(["q_proj", "k_proj"], r=2, lora_alpha=4, init_lora_weights=False))
    add_lora(model, _cfg(["q_proj"], r=r2, lora_alpha=5, init_lora_weights=False), "b")
    return model


def test_weighted_cat_delta_is_the_weighted_sum_at_summed_rank():
    model = _two_adapters()
    add_weighted_adapter(model, ["default", "b"], [0.7, -1.5], "mix", combination_type="cat")
    q = model.layers[0].self_attn.q_proj
    assert q.r["mix"] == 5 and q.scaling["mix"] == 1.0
    expected = 0.7 * q.delta_weight("default") - 1.5 * q.delta_weight("b")
    assert torch.allclose(q.delta_weight("mix"), expected, atol=1e-6)
    k = model.layers[0].self_attn.k_proj  # has only "default": the rows for "b" stay zero
    assert torch.allclose(k.delta_weight("mix"), 0.7 * k.delta_weight("default"), atol=1e-6)
    assert not q.lora_A["mix"].weight.requires_grad and q.active_adapters == ["b"]


def test_weighted_linear_combines_factors_so_cross_terms_appear():
    model = _two_adapters(r2=2)
    add_weighted_adapter(model, ["default", "b"], [0.5, -2.0], "mix", combination_type="linear")
    q = model.layers[0].self_attn.q_proj
    c = [0.5 * q.scaling["default"], -2.0 * q.scaling["b"]]
    (a1, a2), (b1, b2) = (
        [getattr(q, p)[n].weight for n in ("default", "b")] for p in ("lora_A", "lora_B")
    )
    A = c[0] ** 0.5 * a1 - abs(c[1]) ** 0.5 * a2  # the sign goes on A only
    B = c[0] ** 0.5 * b1 + abs(c[1]) ** 0.5 * b2
    assert torch.allclose(q.delta_weight("mix"), B @ A, atol=1e-6)
    weighted_sum = 0.5 * q.delta_weight("default") - 2.0 * q.delta_weight("b")
    assert not torch.allclose(q.delta_weight("mix"), weighted_sum, atol=1e-3)  # cross terms


def test_weighted_adapter_errors_are_clear():
    model = _two_adapters()
    with pytest.raises(ValueError, match="equal rank"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="already has an adapter"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "b")
    with pytest.raises(ValueError, match="one weight per known adapter"):
        add_weighted_adapter(model, ["default", "zzz"], [1, 1], "mix")
    with pytest.raises(ValueError, match="'cat' or 'linear'"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "mix", combination_type="svd")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({}, ValueError, "target_modules is required"),
        ({"target_modules": ["q"], "r": 0}, ValueError, "positive integer"),
        ({"target_modules": ["q"], "lora_alpha": -1}, ValueError, "> 0"),
        ({"target_modules": ["q"], "lora_dropout": 1.0}, ValueError, r"\[0, 1\)"),
        ({"target_modules": ["q"], "bias": "all"}, ValueError, 'must be "none"'),
        (
            {
                "target_modules": "(",
            },
            ValueError,
            "not a valid regex",
        ),
        ({"target_modules": ["q"], "init_lora_weights": "pissa"}, ValueError, "gaussian"),
        (
            {"target_modules": ["q"], "modules_to_save": ["head"]},
            NotImplementedError,
            "modules_to_save",
        ),
    ],
)
def test_config_validation_says_what_is_allowed(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoRAConfig(**kwargs)


def test_peft_dict_round_trip_sorts_targets_and_refuses_unsupported_options():
    cfg = _cfg(["v_proj", "q_proj"], r=4, lora_alpha=8, use_rslora=True)
    d = cfg.to_peft_dict()
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["peft_type"] == "LORA"
    assert LoRAConfig.from_peft_dict(
        {**d, "peft_version": "0.21.2", "megatron_config": None}
    ) == _cfg(["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True)
    with pytest.raises(ValueError, match="alpha_pattern"):
        LoRAConfig.from_peft_dict({**d, "alpha_pattern": {"q_proj": 2}})
    with pytest.raises(ValueError, match="peft_type"):
        LoRAConfig.from_peft_dict({**d, "peft_type": "IA3"})


def test_all_linear_config_is_stored_with_the_resolved_names():
    model = add_lora(_model(), _cfg("all-linear"))
    assert model.lora_configs["default"].target_modules == _wrapped(model)
