"""The book's small "pretrained" base models, stored once as safetensors files.

- an MLP (32 -> 256 -> 256 -> 32) pretrained on a teacher-student regression;
- a tiny LLaMA (2 layers, width 64, grouped-query attention) pretrained to copy
  a string (`SequenceTask("copy")`), to be fine-tuned on other string tasks.


`scripts/make_base_models.py` trains them (a few seconds each) and writes them
into `lora_edu/experiments/data/`; notebooks load them instead of re-training.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from lora_edu.experiments.llama import LlamaConfig, TinyLlama
from lora_edu.experiments.mlp import MLP, TeacherTask
from lora_edu.experiments.sequences import SequenceTask

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


# The tiny LLaMA base: its config, the task it was pretrained on, and how.
LLAMA_BASE = {
    "file": "tiny_llama_copy.safetensors",
    "config": LlamaConfig(),
    "task": "copy",
    "steps": 1500,
    "lr": 3e-3,
    "batch_size": 64,
}


def load_pretrained_llama(device="cpu") -> TinyLlama:
    """The tiny LLaMA pretrained on copying (fresh copy, all parameters trainable)."""
    path = DATA_DIR / LLAMA_BASE["file"]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/make_base_models.py`")
    model = TinyLlama(LLAMA_BASE["config"])
    model.load_state_dict(load_file(str(path)))
    return model.to(device)


def llama_pretraining_task() -> SequenceTask:
    """The task the tiny LLaMA base was pretrained on."""
    return SequenceTask(LLAMA_BASE["task"])
