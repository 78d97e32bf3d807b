"""Chapter 10's bench: what run_method measures is what the tensors and files hold."""

import pytest
import torch

from lora_edu import LoRAConfig
from lora_edu.experiments import SequenceTask, load_pretrained_llama
from lora_edu.experiments.compare import Method, run_method, step_memory
from tests.model_state import assert_unchanged, snapshot

ADAPTERS = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def base():
    return load_pretrained_llama()


@pytest.mark.parametrize(
    "method",
    [Method(1e-2), Method(1e-2, ADAPTERS), Method(1e-3, ADAPTERS, loraplus_ratio=16)],
    ids=["full", "lora", "loraplus"],
)
def test_gradient_and_adam_bytes_are_4_and_8_per_trained_float(base, method):
    task = SequenceTask("shift", sep=33)
    model = method.prepare(base)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = snapshot(model)
    memory = step_memory(model, method, task, batch_size=4)
    assert memory["gradients"] == 4 * trained
    assert memory["optimizer"] == 8 * trained  # exp_avg and exp_avg_sq
    assert memory["activations"] > 0
    assert_unchanged(model, before)  # the step ran on a copy


def test_qlora_weights_take_about_a_seventh_of_the_float_bytes(base):
    float_w = step_memory(Method(1e-2, ADAPTERS).prepare(base), Method(1e-2, ADAPTERS),
                          SequenceTask("copy"), 2)["weights"]  # fmt: skip
    nf4 = Method(1e-2, ADAPTERS, nf4=True)
    q_w = step_memory(nf4.prepare(base), nf4, SequenceTask("copy"), 2)["weights"]
    # the linear weights shrink from 32 to about 4.1 bits; embeddings, norms, head stay
    assert q_w < float_w / 2


def test_run_reports_disk_bytes_counts_and_a_path_of_both_tasks(base):
    new, old = SequenceTask("shift", sep=33), SequenceTask("copy")
    run = run_method(base, Method(1e-2, ADAPTERS), new, steps=6, batch_size=4,
                     old_task=old, every=3)  # fmt: skip
    assert [p[0] for p in run["path"]] == [0, 3, 6]
    assert run["trainable"] == sum(p.numel() for p in run["model"].parameters() if p.requires_grad)
    # the adapter file holds 4 bytes per trained number plus a small header and the JSON
    assert 4 * run["trainable"] < run["disk"] < 4 * run["trainable"] + 16_384
    assert len(run["losses"]) == 6 and run["old_loss"] > 0


def test_full_fine_tuning_ships_the_whole_model(base):
    run = run_method(base, Method(1e-3), SequenceTask("copy"), steps=1, batch_size=2)
    n = sum(t.numel() for t in run["model"].state_dict().values())
    assert 4 * n < run["disk"] < 4 * n + 16_384


def test_method_refuses_quantization_or_loraplus_without_adapters():
    with pytest.raises(ValueError, match="need adapters"):
        Method(1e-2, nf4=True)
    with pytest.raises(ValueError, match="need adapters"):
        Method(1e-2, loraplus_ratio=16)
    with pytest.raises(ValueError, match="lr must be > 0"):
        Method(0.0)


def test_a_spare_separator_marks_a_task_and_others_are_refused():
    seq = SequenceTask("shift", n=3, sep=33).sample(2, torch.Generator().manual_seed(0))
    assert (seq[:, 3] == 33).all()
    assert torch.equal(seq[:, 4:], (seq[:, :3] + 1) % 32)
    for bad in (5, 31, 40):
        with pytest.raises(ValueError, match="spare token 33..39"):
            SequenceTask("copy", sep=bad)
