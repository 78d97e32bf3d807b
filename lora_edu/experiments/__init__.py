"""Experiments shared by the chapters: runtime setup, tiny models, tasks, training.

Every experiment is a function of a small config with a "quick" preset (CPU,
about a minute per notebook) and a "full" preset (a Colab GPU).
"""

from lora_edu.experiments.llama import LlamaConfig, TinyLlama
from lora_edu.experiments.mlp import MLP, LinearShiftTask, SumTask, TeacherTask
from lora_edu.experiments.pretrained import (
    llama_pretraining_task,
    load_pretrained_llama,
    load_pretrained_mlp,
    pretraining_task,
)
from lora_edu.experiments.report import glue, sig
from lora_edu.experiments.runtime import (
    Runtime,
    get_device,
    get_scale,
    seed_everything,
    setup,
)
from lora_edu.experiments.sequences import SequenceTask
from lora_edu.experiments.train import evaluate, train

__all__ = [
    "MLP",
    "LinearShiftTask",
    "LlamaConfig",
    "Runtime",
    "SequenceTask",
    "SumTask",
    "TeacherTask",
    "TinyLlama",
    "llama_pretraining_task",
    "load_pretrained_llama",
    "evaluate",
    "get_device",
    "get_scale",
    "glue",
    "load_pretrained_mlp",
    "pretraining_task",
    "seed_everything",
    "setup",
    "sig",
    "train",
]
