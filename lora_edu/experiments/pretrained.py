"""The book's small "pretrained" base models, stored once as safetensors files.

`scripts/make_base_models.py` trains them (a few seconds each) and writes them
into `lora_edu/experiments/data/`; notebooks load them instead of re-training.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from lora_edu.experiments.mlp import MLP, TeacherTask

DATA_DIR = Path(__file__).parent / "data"

# The MLP base: its architecture, the task it was pretrained on, and how.
MLP_BASE = {
    "file": "mlp_base.safetensors",
    "dims": {"d_in": 32, "d_hidden": 256, "d_out": 32},
    "task_seed": 1,  # TeacherTask(seed=1) is the pretraining task
    "steps": 3000,
    "lr": 1e-3,
    "batch_size": 256,
}


def pretraining_task() -> TeacherTask:
    """The task the MLP base was pretrained on."""
    dims = MLP_BASE["dims"]
    return TeacherTask(d_in=dims["d_in"], d_out=dims["d_out"], seed=MLP_BASE["task_seed"])


def load_pretrained_mlp(device="cpu") -> MLP:
    """The pretrained MLP base (fresh copy, all parameters trainable)."""
    path = DATA_DIR / MLP_BASE["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/make_base_models.py`")
    model = MLP(**MLP_BASE["dims"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device)
