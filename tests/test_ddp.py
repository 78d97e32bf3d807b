"""Data-parallel LoRA (lora_edu.experiments.ddp): what DDP all-reduces, and that the ranks agree.

Two CPU processes (gloo on 127.0.0.1) train the tiny LLaMA for a few steps, with LoRA and
fully; a communication hook counts the bytes of every gradient bucket. The runs are started
as subprocesses with a timeout, and every collective has one too, so a hung process group
fails the test instead of hanging it. The expected byte counts are computed here from the
model's layer shapes, not read from the code under test.
"""

import json
import subprocess
import sys

import pytest
from torch import nn

from lora_edu.experiments import ddp, load_pretrained_llama

STEPS, R = 3, 8
FLOAT32 = 4  # bytes per gradient value


def _run(*args) -> dict:
    cmd = [sys.executable, "-m", "lora_edu.experiments.ddp", "--json", "--timeout", "20"]
    done = subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)["results"]


@pytest.fixture(scope="module")
def both():
    """One run of both modes; two micro-batches per step and small (0.1 MB) gradient buckets."""
    return _run(
        "--world-size", 2, "--steps", STEPS, "--batch-per-rank", 4, "--r", R, "--accum", 2,
        "--bucket-cap-mb", 0.1,
    )  # fmt: skip


def _expected_trainable(mode: str) -> int:
    """Trainable numbers: every parameter, or r x (in + out) per adapted linear layer."""
    model = load_pretrained_llama()
    if mode == "full":
        return sum(p.numel() for p in model.parameters())
    return sum(
        R * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"  # all-linear leaves the head out
    )


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_each_step_all_reduces_four_bytes_per_trainable_parameter(both, mode):
    expected = FLOAT32 * _expected_trainable(mode)
    assert both[mode]["bytes"] == [expected] * STEPS


def test_lora_sends_the_trainable_parameter_ratio_of_full_fine_tuning(both):
    ratio = both["lora"]["bytes"][0] / both["full"]["bytes"][0]
    assert ratio == pytest.approx(_expected_trainable("lora") / _expected_trainable("full"))
    assert ratio < 0.25  # frozen base weights have no gradient, so nothing of theirs is sent


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ranks_hold_identical_parameters_after_training(both, mode):
    assert both[mode]["rank_diff"] == 0.0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ddp_matches_one_process_on_the_concatenated_batch(both, mode):
    res = both[mode]
    assert len(res["losses"]) == len(res["reference_losses"]) == STEPS
    assert res["loss_diff"] <= 1e-5 * max(res["reference_losses"])
    assert res["param_diff"] <= 1e-4
    assert res["losses"][0] != res["losses"][-1]  # training happened


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_no_sync_micro_batches_send_nothing_and_the_last_sends_everything(both, mode):
    expected = FLOAT32 * _expected_trainable(mode)
    assert both[mode]["micro_bytes"] == [0, expected] * STEPS


def test_smaller_buckets_split_the_gradients_but_send_the_same_bytes(both):
    buckets = both["full"]["buckets"]
    assert buckets[-1] > 1  # after DDP rebuilds its buckets (the first step uses one)
    assert both["full"]["bytes"][-1] == FLOAT32 * _expected_trainable("full")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"world_size": 0}, "world_size"), ({"modes": ("lora", "qlora")}, "modes"),
     ({"batch_per_rank": 6, "accum": 4}, "multiple of accum"), ({"timeout_s": 0}, "timeout")],
)  # fmt: skip
def test_bad_configs_are_refused_before_any_process_starts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ddp.DDPConfig(**kwargs)
