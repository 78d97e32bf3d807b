"""lora_edu.experiments: scale and device choice, reproducible training, the stored base."""

import pytest
import torch

from lora_edu.experiments import (
    MLP,
    evaluate,
    get_scale,
    load_pretrained_mlp,
    pretraining_task,
    setup,
    sig,
    train,
)


def test_scale_is_quick_on_cpu_full_on_cuda_and_env_overrides(monkeypatch):
    monkeypatch.delenv("LORA_EDU_SCALE", raising=False)
    assert get_scale(torch.device("cpu")) == "quick"
    assert get_scale(torch.device("cuda")) == "full"
    monkeypatch.setenv("LORA_EDU_SCALE", "full")
    assert get_scale(torch.device("cpu")) == "full"


def test_unknown_scale_is_refused_with_the_allowed_values(monkeypatch):
    monkeypatch.setenv("LORA_EDU_SCALE", "huge")
    with pytest.raises(ValueError, match="quick.*full"):
        get_scale()


def test_setup_picks_preset_by_scale(monkeypatch):
    monkeypatch.setenv("LORA_EDU_SCALE", "quick")
    rt = setup(seed=3, verbose=False)
    assert rt.pick(quick=1, full=2) == 1 and rt.seed == 3


def test_training_is_reproducible_and_reduces_loss():
    task = pretraining_task()
    curves = []
    for _ in range(2):
        torch.manual_seed(0)
        curves.append(train(MLP(), task, steps=30, lr=1e-3, batch_size=32))
    assert curves[0] == curves[1]
    assert curves[0][-1] < curves[0][0]


def test_stored_base_model_has_learned_its_pretraining_task():
    task = pretraining_task()
    torch.manual_seed(0)
    untrained = evaluate(MLP(), task)
    assert evaluate(load_pretrained_mlp(), task) < 0.01 * untrained


def test_new_skill_task_adds_a_second_teacher():
    base = pretraining_task()
    task = base.with_new_skill(width=4, weight=0.5)
    x = torch.randn(16, 32)
    skill = task.teachers[1]
    assert torch.allclose(task.target(x), base.target(x) + 0.5 * skill.target(x))
    assert skill.w1.shape == (4, 32)


@pytest.mark.parametrize(
    ("x", "expected"), [(123456, 123000), (0.0012345, 0.00123), (-9.876, -9.88), (0, 0)]
)
def test_sig_rounds_to_three_significant_figures(x, expected):
    assert sig(x) == expected
