"""lora_edu.qlora: a 4-bit base under LoRA, LoFTQ, merging, and the memory estimator.

The estimator is checked against the real tensors of the tiny models (weights,
packed 4-bit codes and their state, adapters, gradients, Adam states, the tensors
autograd saves for backward) and against known sizes of LLaMA.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_edu import LoRAConfig, add_lora, count_parameters, merge_and_unload
from lora_edu.experiments import LlamaConfig, TinyLlama, load_pretrained_llama, load_pretrained_mlp
from lora_edu.lora import LoRALinear
from lora_edu.qlora import (
    GB,
    LLAMA_SHAPES,
    METHODS,
    MemoryEstimate,
    Method,
    ModelShape,
    dequantize_and_merge,
    estimate_memory,
    llama_activation_bytes,
    loftq,
    loftq_init,
    prepare_qlora,
    print_memory_table,
    quantized_nbytes,
)
from lora_edu.quant import Linear4bit, dequantize_4bit, quantize_4bit

ALL = LoRAConfig(r=8, lora_alpha=16, target_modules="all-linear")


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _ids(batch=8, seq=24, seed=0):
    return torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _lm_loss(model, ids):
    logits = model(ids[:, :-1])  # (b, t, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


# --- prepare_qlora ---------------------------------------------------------------------


def test_prepare_qlora_quantizes_every_linear_but_the_head_and_freezes_all():
    model = prepare_qlora(load_pretrained_llama())
    kinds = {n: type(m) for n, m in model.named_modules() if n.endswith("_proj")}
    assert len(kinds) == 14 and set(kinds.values()) == {Linear4bit}
    assert type(model.lm_head) is nn.Linear
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.quant_type == "nf4" and layer.blocksize == 64 and layer.absmax2 is not None


def test_prepare_qlora_outputs_are_those_of_the_dequantized_weights():
    base = load_pretrained_mlp()
    model = prepare_qlora(copy.deepcopy(base), double_quant=False)
    ref = copy.deepcopy(base)
    for name in ("fc1", "fc2", "fc3"):
        getattr(ref, name).weight.data = getattr(model, name).dequantize()
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(model(x), base(x), atol=1e-3)  # 4 bits do change the outputs


def test_prepare_qlora_skips_named_layers_and_upcasts_16bit_parameters():
    model = load_pretrained_llama().to(torch.bfloat16)
    prepare_qlora(model, skip=("o_proj",))
    assert type(model.model.layers[1].self_attn.o_proj) is nn.Linear
    assert type(model.model.layers[1].self_attn.v_proj) is Linear4bit
    assert model.model.norm.weight.dtype == torch.float32  # PEFT's upcast of what stays
    kept = prepare_qlora(load_pretrained_llama().to(torch.bfloat16), keep_dtype=None)
    assert kept.model.norm.weight.dtype == torch.bfloat16


def test_prepare_qlora_refuses_a_model_that_already_has_lora():
    model = add_lora(load_pretrained_mlp(), LoRAConfig(target_modules=["fc2"]))
    with pytest.raises(ValueError, match="before add_lora"):
        prepare_qlora(model)


def test_lora_on_a_4bit_base_trains_only_the_adapters():
    model = add_lora(prepare_qlora(load_pretrained_llama()), ALL)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    codes = layer.base_layer.packed.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _lm_loss(model, _ids()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    opt.step()
    assert torch.equal(layer.base_layer.packed, codes)
    assert layer.lora_B["default"].weight.abs().sum() > 0


# --- counting ---------------------------------------------------------------------------


def test_naive_count_of_a_4bit_model_sees_about_half_the_weights_count_parameters_all():
    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_attention_heads=8,
                      num_key_value_heads=4)  # fmt: skip
    torch.manual_seed(0)
    base = TinyLlama(cfg)
    true = sum(p.numel() for p in base.parameters())
    model = prepare_qlora(copy.deepcopy(base), double_quant=False)
    naive = sum(t.numel() for t in [*model.parameters(), *model.buffers()])  # bytes as values
    assert 0.45 < naive / true < 0.55
    packed = sum(b.numel() for n, b in model.named_buffers() if n.endswith("packed"))
    assert 2 * packed == sum(o * i for o, i in ModelShape.from_model(base).linear)
    assert count_parameters(model)["total"] == true
    lora = add_lora(model, ALL)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if ".lora_" in n)
    assert count_parameters(lora) == count_parameters(add_lora(copy.deepcopy(base), ALL))
    assert count_parameters(lora)["trainable"] == n_lora


# --- LoftQ -------------------------------------------------------------------------------


def _weight(shape=(128, 96), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_loftq_one_iteration_keeps_qw_and_adds_its_best_rank_r_error():
    w = _weight()
    packed, state, a, b = loftq(w, r=8, scaling=2.0, num_iter=1)
    ref, _ = quantize_4bit(w, "nf4", 64)
    assert torch.equal(packed, ref)
    err = w - dequantize_4bit(packed, state)
    s = torch.linalg.svdvals(err)
    left = (err - 2.0 * b @ a).norm() ** 2
    torch.testing.assert_close(left, s[8:].pow(2).sum(), rtol=1e-4, atol=0)
    assert a.shape == (8, 96) and b.shape == (128, 8)


def test_loftq_iterations_reduce_the_error_of_q_plus_ba():
    w = _weight()

    def error(n):
        packed, state, a, b = loftq(w, r=8, num_iter=n)
        return (w - dequantize_4bit(packed, state) - b @ a).norm().item()

    plain = (w - dequantize_4bit(*quantize_4bit(w))).norm().item()
    assert error(5) < error(1) < plain


def test_loftq_init_starts_the_4bit_model_closer_to_the_float_model():
    base = load_pretrained_mlp()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    qlora = add_lora(prepare_qlora(copy.deepcopy(base)), ALL)
    loft = loftq_init(copy.deepcopy(qlora), base, num_iter=2)
    gap = [(m(x) - base(x)).norm().item() for m in (qlora, loft)]
    assert gap[1] < 0.9 * gap[0]
    assert isinstance(loft.fc2.base_layer, Linear4bit) and loft.fc2.base_layer.absmax2 is not None
    assert not any(p.requires_grad for p in loft.fc2.base_layer.parameters())
    assert loft.fc2.lora_A["default"].weight.requires_grad


# --- merging -----------------------------------------------------------------------------


def _trained_qlora(seed=0):
    base = load_pretrained_mlp()
    model = add_lora(prepare_qlora(copy.deepcopy(base)), ALL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                w = layer.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return model


def test_dequantize_and_merge_keeps_the_outputs_requantizing_changes_them():
    model = _trained_qlora()
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    y = model(x).detach()
    with pytest.raises(TypeError, match="Dequantize it first"):
        merge_and_unload(copy.deepcopy(model))
    merged = dequantize_and_merge(copy.deepcopy(model))
    assert type(merged.fc2) is nn.Linear and not hasattr(merged, "lora_configs")
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    requant = prepare_qlora(copy.deepcopy(merged))
    assert (requant(x) - y).norm() > 1e-2 * y.norm()
    half = dequantize_and_merge(copy.deepcopy(model), dtype=torch.bfloat16)
    assert half.fc2.weight.dtype == torch.bfloat16


# --- memory: against real tensors --------------------------------------------------------


FP32_LORA = Method("fp32 LoRA", 4, 4, False, 4, 8, 4)
FP32_QLORA = Method("fp32 QLoRA", 0, 4, False, 4, 8, 4, quant_blocksize=64)
FP32_QLORA_DQ = Method("fp32 QLoRA dq", 0, 4, False, 4, 8, 4, quant_blocksize=64, double_quant=True)


@pytest.mark.parametrize("loader", [load_pretrained_mlp, load_pretrained_llama])
def test_model_shape_counts_every_parameter_once(loader):
    model = loader()
    shape = ModelShape.from_model(model)
    assert shape.numel == sum(p.numel() for p in model.parameters())
    assert ModelShape.from_model(add_lora(copy.deepcopy(model), ALL)) == shape
    assert ModelShape.from_model(prepare_qlora(copy.deepcopy(model))) == shape
    assert ModelShape.from_model(add_lora(prepare_qlora(copy.deepcopy(model)), ALL)) == shape


@pytest.mark.parametrize("loader", [load_pretrained_mlp, load_pretrained_llama])
def test_weight_bytes_match_the_tensors_fp32_bf16_and_4bit(loader):
    model = loader()
    shape = ModelShape.from_model(model)
    assert estimate_memory(shape, "full fp32").weights == _nbytes(model.parameters())
    assert estimate_memory(shape, "LoRA").weights == _nbytes(model.to(torch.bfloat16).parameters())
    for method, dq in [(FP32_QLORA, False), (FP32_QLORA_DQ, True)]:
        q = prepare_qlora(loader(), double_quant=dq)
        real = _nbytes([*q.parameters(), *q.buffers()])
        assert estimate_memory(shape, method).weights == real


@pytest.mark.parametrize("shape", [(64, 64), (13, 64), (176, 64), (1000, 777)])
@pytest.mark.parametrize("dq", [False, True])
def test_quantized_nbytes_is_the_packed_codes_plus_the_state(shape, dq):
    packed, state = quantize_4bit(torch.randn(shape), "nf4", 64, dq)
    assert quantized_nbytes(shape[0] * shape[1], 64, dq) == _nbytes([packed]) + state.nbytes()


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_adapters_gradients_and_adam_states_after_one_step(method):
    model = load_pretrained_llama()
    shape = ModelShape.from_model(model)
    if method == "qlora":
        prepare_qlora(model)
    if method != "full":
        add_lora(model, ALL)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    _lm_loss(model, _ids()).backward()
    opt.step()
    est = estimate_memory(shape, "full fp32" if method == "full" else FP32_LORA, r=8)
    adapters = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert est.adapters == _nbytes(adapters)
    assert est.gradients == _nbytes(p.grad for p in params)
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert est.optimizer == pytest.approx(_nbytes(states), rel=0.02)  # + one `step` per tensor


def _saved_activation_bytes(model, ids):
    """Bytes of the tensors autograd keeps for backward, each storage once, weights excluded."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _lm_loss(model, ids)
    return sum(storages.values())


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_activation_formula_matches_the_tensors_autograd_saves(method):
    cfg = LlamaConfig(num_hidden_layers=4)
    torch.manual_seed(0)
    model = TinyLlama(cfg)
    if method == "qlora":
        prepare_qlora(model)
    if method != "full":
        add_lora(model, ALL)
    ids = _ids(batch=16, seq=33)
    real = _saved_activation_bytes(model, ids)
    full = method == "full"
    est = llama_activation_bytes(cfg, 16, 32, 4, full=full, lora_r=0 if full else 8)
    assert est == pytest.approx(real, rel=0.05)


def test_checkpointing_keeps_one_input_per_layer_plus_one_layer():
    cfg = LLAMA_SHAPES["LLaMA-7B"]
    plain = llama_activation_bytes(cfg, 2, 512, lora_r=16)
    ckpt = llama_activation_bytes(cfg, 2, 512, lora_r=16, checkpointing=True)
    head = 2 * 512 * (4096 * 2 + 4 * 32000)
    per_layer = (plain - head) // 32
    assert ckpt == 32 * 2 * 512 * 4096 * 2 + per_layer + head
    assert llama_activation_bytes(cfg, 4, 512) == 2 * llama_activation_bytes(cfg, 2, 512)
    eager = llama_activation_bytes(cfg, 1, 512, flash=False)
    assert eager - llama_activation_bytes(cfg, 1, 512) == 32 * 32 * 512 * 512 * 2


# --- memory: known values ---------------------------------------------------------------


def test_llama_7b_has_6_74b_parameters_and_13_5_gb_of_16bit_weights():
    shape = ModelShape.llama(LLAMA_SHAPES["LLaMA-7B"])
    assert shape.numel == 6_738_415_616
    assert estimate_memory(shape, "LoRA").weights / GB == pytest.approx(13.48, abs=0.01)
    assert ModelShape.llama(LLAMA_SHAPES["LLaMA-13B"]).numel == pytest.approx(13.0e9, rel=0.01)
    assert ModelShape.llama(LLAMA_SHAPES["LLaMA-2-70B"]).numel == pytest.approx(69.0e9, rel=0.01)


def test_full_finetuning_costs_16_bytes_per_parameter_in_fp32_and_in_mixed_precision():
    shape = ModelShape.llama(LLAMA_SHAPES["LLaMA-7B"])
    for name in ["full fp32", "full mixed"]:
        est = estimate_memory(shape, name)
        assert (est.total - est.activations) == 16 * shape.numel
    est65 = estimate_memory(LLAMA_SHAPES["LLaMA-65B"], "full bf16")
    assert 780 < (est65.total - est65.activations) / GB < 790  # QLoRA paper: "> 780 GB"


def test_qlora_weights_cost_about_4_127_bits_per_quantized_parameter():
    shape = ModelShape.llama(LLAMA_SHAPES["LLaMA-7B"])
    linear = sum(o * i for o, i in shape.linear)
    for name, bits in [("QLoRA", 4.5), ("QLoRA + DQ", 4.127)]:
        weights = estimate_memory(shape, name).weights - 2 * shape.other
        assert 8 * weights / linear == pytest.approx(bits, abs=0.002)
    assert estimate_memory(shape, "QLoRA + DQ").total < estimate_memory(shape, "LoRA").total / 2


def test_paged_optimizer_moves_the_state_out_of_the_peak_but_does_not_shrink_it():
    est = MemoryEstimate("x", weights=10, adapters=1, gradients=1, optimizer=2, activations=5)
    assert est.total == 19
    assert est.peak() == 19 and est.peak(paged=True) == 17
    small = MemoryEstimate("x", 10, 1, 1, optimizer=8, activations=3)
    assert small.peak(paged=True) == 20 == small.total - small.activations


def test_print_memory_table_prints_one_row_per_method(capsys):
    print_memory_table({m: estimate_memory(LLAMA_SHAPES["LLaMA-7B"], m) for m in METHODS})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("(GB)") and lines[0].split()[-1] == "total"
    assert len(lines) == 1 + len(METHODS)
    assert lines[5].split()[:2] == ["LoRA", "13.5"]


def test_methods_are_validated_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown method"):
        estimate_memory(LLAMA_SHAPES["LLaMA-7B"], "QLoRA+DQ")
    with pytest.raises(ValueError, match="quant_blocksize"):
        Method("x", 0, 2, False, 4, 8, 2, quant_blocksize=100)
    with pytest.raises(ValueError, match="weight_bytes > 0"):
        Method("x", 0, 2, False, 4, 8, 2)
    with pytest.raises(ValueError, match=">= 0"):
        Method("x", 2, 2, False, -4, 8, 2)


def test_dequantize_and_merge_keeps_dora_magnitudes_on_a_4bit_base():
    torch.manual_seed(0)
    model = prepare_qlora(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)), skip=())
    add_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(0.05 * torch.randn_like(p))  # as if trained: B and m both moved
    x = torch.randn(16, 64)
    expected = model(x)
    merged = dequantize_and_merge(model)
    assert isinstance(merged[0], nn.Linear) and isinstance(merged[2], nn.Linear)
    assert torch.allclose(merged(x), expected, rtol=1e-5, atol=1e-5)
