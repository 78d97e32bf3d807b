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


def test_low_rank_shift_has_the_planted_rank_and_a_zero_best_loss_at_that_rank():
    from lora_edu.experiments import LinearShiftTask

    task = LinearShiftTask.low_rank(48, 32, rank=3, seed=1)
    assert torch.linalg.matrix_rank(task.delta).item() == 3
    assert task.best_loss(3) < 1e-10 < task.best_loss(2)
    student = task.student()
    x, y = task.sample(4096, torch.Generator().manual_seed(0))
    # the untouched student's loss is the energy of the shift: E||delta x||^2 / d_out
    expected = task.delta.pow(2).sum().item() / 48
    assert abs(task.loss(student, (x, y)).item() - expected) < 0.1 * expected


def test_decaying_shift_is_full_rank_and_more_rank_always_helps():
    from lora_edu.experiments import LinearShiftTask

    task = LinearShiftTask.decaying(64, 40, power=1.0)
    s = torch.linalg.svdvals(task.delta)
    assert (s > 0).all() and torch.allclose(s[0] / s[9], torch.tensor(10.0), rtol=1e-3)
    losses = [task.best_loss(r) for r in [1, 4, 16, 39]]
    assert all(a > b for a, b in zip(losses, losses[1:]))
