"""lora_edu.loraplus against PEFT's create_loraplus_optimizer: same groups, same lr, same decay."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer as peft_create
from torch import nn

from lora_edu import LoRAConfig, add_lora
from lora_edu.loraplus import GROUPS, create_loraplus_optimizer, loraplus_groups

PREFIX = "base_model.model."


class Net(nn.Module):
    """Embedding, two linear layers, a LayerNorm and a free 1-D parameter that is not a bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)
        self.gain = nn.Parameter(torch.ones(8))

    def forward(self, ids):
        return self.fc2(self.norm(self.fc1(self.emb(ids)))) * self.gain


def _unfreeze_extras(model, prefix=""):
    """Make a LayerNorm, a bias, the free 1-D gain and a full matrix trainable beside LoRA."""
    for name, p in model.named_parameters():
        if name.removeprefix(prefix) in {"norm.weight", "norm.bias", "fc2.base_layer.bias",
                                         "gain", "emb.weight"}:  # fmt: skip
            p.requires_grad_(True)


def _by_name(model, opt, prefix=""):
    """{parameter name without PEFT's prefix: (lr, weight_decay)} for every optimized parameter."""
    names = {id(p): n.removeprefix(prefix) for n, p in model.named_parameters()}
    return {
        names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]
    }


@pytest.fixture
def pair():
    torch.manual_seed(0)
    base = Net()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    ours = add_lora(copy.deepcopy(base), LoRAConfig(r=4, target_modules=["fc1", "fc2"]))
    _unfreeze_extras(theirs, PREFIX)
    _unfreeze_extras(ours)
    return ours, theirs


@pytest.mark.parametrize("ratio, wd", [(16, 0.0), (4, 0.1)])
def test_every_parameter_gets_the_same_lr_and_weight_decay_as_peft(pair, ratio, wd):
    ours, theirs = pair
    kw = dict(lr=1e-3, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd)
    mine = _by_name(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **kw))
    ref = _by_name(theirs, peft_create(theirs, torch.optim.AdamW, **kw), PREFIX)
    assert mine == ref
    assert len(mine) == 4 + 5  # four LoRA factors and the five unfrozen extras
    assert mine["fc1.lora_B.default.weight"] == (1e-3 * ratio, wd)
    assert mine["fc1.lora_A.default.weight"] == (1e-3, wd)
    assert mine["gain"] == (1e-3 * ratio, wd)  # 1-D, not a bias: B's rate, decayed
    assert mine["norm.weight"] == mine["fc2.base_layer.bias"] == (1e-3 * ratio, 0.0)
    assert mine["emb.weight"] == (1e-3, wd)  # a trainable matrix that is not LoRA: A's rate


def test_group_assignment_names_peft_s_four_groups(pair):
    ours, _ = pair
    groups = loraplus_groups(ours)
    assert set(groups.values()) == {"groupA", "groupB", "groupB_no_decay"}
    assert groups["fc2.lora_B.default.weight"] == "groupB"
    assert groups["norm.bias"] == "groupB_no_decay"
    assert "fc1.base_layer.weight" not in groups  # frozen parameters are left out


def test_lora_on_an_embedding_of_a_peft_model_gets_the_embedding_rate():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["emb", "fc1"]))
    kw = dict(lr=2e-4, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-5)
    mine = create_loraplus_optimizer(model, torch.optim.AdamW, **kw)
    ref = peft_create(model, torch.optim.AdamW, **kw)
    assert len(mine.param_groups) == len(ref.param_groups) == len(GROUPS)
    for a, b in zip(mine.param_groups, ref.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
        assert (a["lr"], a["weight_decay"]) == (b["lr"], b["weight_decay"])
    assert {loraplus_groups(model)[n] for n in _by_name(model, mine) if "emb" in n} == {"embedding"}


def test_an_optimizer_weight_decay_is_overridden_as_in_peft_and_warned_about(pair):
    ours, theirs = pair
    with pytest.warns(UserWarning, match="weight_decay=0.3 is ignored"):
        mine = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, weight_decay=0.3)
    ref = peft_create(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.3)
    assert _by_name(ours, mine) == _by_name(theirs, ref, PREFIX)
    assert {g["weight_decay"] for g in mine.param_groups} == {0.0}


def test_b_moves_ratio_times_further_than_a_on_the_first_adam_step():
    torch.manual_seed(0)
    layer = add_lora(nn.Sequential(nn.Linear(8, 8)), LoRAConfig(r=2, target_modules=["0"]))
    with torch.no_grad():
        layer[0].lora_B["default"].weight.normal_()  # so that A has a gradient too
    opt = create_loraplus_optimizer(layer, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=16)
    a, b = layer[0].lora_A["default"].weight, layer[0].lora_B["default"].weight
    a0, b0 = a.detach().clone(), b.detach().clone()
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()  # Adam's first step moves every coordinate by lr (its sign-like update)
    assert torch.allclose((a - a0).abs(), torch.full_like(a, 1e-3), rtol=1e-3)
    assert torch.allclose((b - b0).abs(), torch.full_like(b, 16e-3), rtol=1e-3)


def test_bad_arguments_are_refused_with_a_clear_message():
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(ValueError, match="must be > 0"):
        create_loraplus_optimizer(nn.Linear(3, 3), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0)


def test_loraplus_ratio_under_adam_is_the_scale_times_the_ratio():
    from lora_edu.experiments import MLP, TeacherTask, train
    from lora_edu.loraplus import loraplus_param_groups

    def run(alpha, ratio):
        torch.manual_seed(0)
        model = add_lora(MLP(8, 32, 4), LoRAConfig(r=4, lora_alpha=alpha, target_modules=["fc2"]))
        with torch.no_grad():  # a random base: re-draw it the same way for both runs
            torch.manual_seed(1)
            for p in model.parameters():
                if not p.requires_grad:
                    p.normal_(std=0.3)
        groups = loraplus_param_groups(model, 1e-3, ratio)
        return torch.tensor(train(model, TeacherTask(8, 4), 20, 1e-3, params=groups))

    plus, big_alpha = run(4, 8.0), run(32, 1.0)
    assert ((plus - big_alpha).abs() / big_alpha).max() < 1e-4  # Adam's epsilon only


def test_shifted_teacher_task_starts_at_the_requested_loss_with_a_planted_rank_4_change():
    from lora_edu.experiments.dynamics import ShiftedTeacherTask, pretrained_mlp

    base = pretrained_mlp(64)
    assert base.fc2.in_features == 64
    task = ShiftedTeacherTask(base, layer="fc2", rank=4, base_loss=0.2)
    assert task.loss(base, task.probe()).item() == pytest.approx(0.2, rel=0.05)
    change = task.teacher.fc2.weight - base.fc2.weight
    assert torch.linalg.matrix_rank(change).item() == 4
    assert torch.equal(task.teacher.fc1.weight, base.fc1.weight)


def test_update_split_measures_both_factors_after_both_have_moved():
    from lora_edu.experiments.dynamics import ShiftedTeacherTask, pretrained_mlp, update_split

    base = pretrained_mlp(64)
    task = ShiftedTeacherTask(base, base_loss=0.2)
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(base), LoRAConfig(r=8, lora_alpha=8, target_modules=["fc2"]))
    via_a, via_b = update_split(model, task, "fc2", lr=1e-2, steps=1, probe=task.probe(256))
    assert via_a > 0 and via_b > 0
    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(base), LoRAConfig(r=8, lora_alpha=8, target_modules=["fc2"]))
    first_a, _ = update_split(model, task, "fc2", lr=1e-2, steps=0, probe=task.probe(256))
    assert first_a == 0.0  # at step 0, B = 0: A's gradient and A's effect are zero
