"""Test helper: take a snapshot of a model and assert later that nothing changed.

Used by every test of a call that must fail cleanly: the module tree, every
parameter (values and requires_grad) and the stored LoRA configs must be as before.
"""

import torch


def snapshot(model):
    tree = [(n, type(m).__name__) for n, m in model.named_modules()]
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return tree, params, dict(getattr(model, "lora_configs", {}))


def assert_unchanged(model, snap):
    tree, params, configs = snapshot(model)
    assert tree == snap[0] and configs == snap[2]
    assert params.keys() == snap[1].keys()
    for n, (p, grad) in params.items():
        assert torch.equal(p, snap[1][n][0]) and grad == snap[1][n][1], n
