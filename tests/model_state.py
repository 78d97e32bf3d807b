"""Test helper: take a snapshot of a model and assert later that nothing changed.

Used by every test of a call that must fail cleanly. Compared: the module tree (names and
types), every parameter (values, dtype and requires_grad), every buffer, the stored LoRA
configs, the train/eval flag of every module, and in each LoRA layer its adapter names,
ranks, alphas, scalings, active and merged adapters and the disable flag.
"""

import torch

LAYER_STATE = ("r", "lora_alpha", "scaling", "use_rslora", "active_adapters", "merged_adapters")


def _layer_state(module):
    """The bookkeeping of a LoRALinear (plain Python values), or None for other modules."""
    if not hasattr(module, "lora_A"):
        return None
    state = {name: _copy(getattr(module, name, None)) for name in LAYER_STATE}
    state["adapters"] = sorted(module.lora_A)
    state["disable_adapters"] = module.disable_adapters
    state["magnitudes"] = sorted(getattr(module, "lora_magnitude_vector", {}))
    return state


def _copy(value):
    return type(value)(value) if isinstance(value, (dict, list)) else value


def snapshot(model):
    tree = [(n, type(m).__name__, m.training, _layer_state(m)) for n, m in model.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return tree, params, dict(getattr(model, "lora_configs", {})), buffers


def assert_unchanged(model, snap):
    tree, params, configs, buffers = snapshot(model)
    assert tree == snap[0] and configs == snap[2]
    assert params.keys() == snap[1].keys() and buffers.keys() == snap[3].keys()
    for n, (p, grad) in params.items():
        before, grad_before = snap[1][n]
        assert p.dtype == before.dtype and torch.equal(p, before) and grad == grad_before, n
    for n, b in buffers.items():
        assert b.dtype == snap[3][n].dtype and torch.equal(b, snap[3][n]), n
