"""Chapter 10's comparison: one base, one task, every method, the same seeds and steps.

A `Method` says what is trained: everything (full fine-tuning), or LoRA adapters
described by a `LoRAConfig` (rsLoRA and DoRA are config flags), optionally on an
NF4 base (QLoRA) or with LoRA+'s learning rates. `run_method` trains a fresh copy
of the base and measures what the chapter's table reports: trainable numbers, the
bytes saved to disk, the bytes one training step holds, the losses, the time.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lora_edu.adapters import save_adapter
from lora_edu.dora import saved_bytes
from lora_edu.experiments.train import evaluate, train
from lora_edu.inject import LoRAConfig, add_lora, count_parameters
from lora_edu.loraplus import loraplus_param_groups
from lora_edu.qlora import prepare_qlora


@dataclass(frozen=True)
class Method:
    """How to fine-tune: `lora=None` trains every parameter (full fine-tuning).

    Args:
        lr: learning rate (of A, for LoRA+).
        lora: the adapters to add, or None.
        nf4: quantize the base to NF4 first (QLoRA; needs `lora`).
        loraplus_ratio: B's learning rate over A's (LoRA+; needs `lora`).
    """

    lr: float
    lora: LoRAConfig | None = None
    nf4: bool = False
    loraplus_ratio: float | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lora is None and (self.nf4 or self.loraplus_ratio is not None):
            raise ValueError("nf4 and loraplus_ratio need adapters: give a LoRAConfig as lora")

    def prepare(self, base: nn.Module) -> nn.Module:
        """A fresh copy of `base`, quantized and/or with adapters as this method says."""
        model = copy.deepcopy(base)
        if self.nf4:
            prepare_qlora(model)
        if self.lora is not None:
            add_lora(model, self.lora)
        return model

    def param_groups(self, model: nn.Module):
        """What the optimizer trains: LoRA+'s groups, or (None) every trainable parameter."""
        if self.loraplus_ratio is None:
            return None
        return loraplus_param_groups(model, self.lr, loraplus_lr_ratio=self.loraplus_ratio)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_memory(model: nn.Module, method: Method, task, batch_size: int) -> dict[str, int]:
    """Bytes one AdamW training step holds, by kind, counted tensor by tensor (CPU or GPU).

    weights: parameters and buffers (4-bit codes at their packed size); gradients and
    optimizer: of the trained parameters after one step; activations: what autograd saves
    for backward (`dora.saved_bytes`); on a GPU also cuda_peak, the allocator's peak during
    the step. Runs the step on a copy, so `model` is unchanged.
    """
    model = copy.deepcopy(model)
    device = next(model.parameters()).device
    batch = task.sample(batch_size, torch.Generator().manual_seed(0), device)
    groups = method.param_groups(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained if groups is None else groups, lr=method.lr)
    loss = None

    def forward():
        nonlocal loss
        loss = task.loss(model, batch)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    activations = saved_bytes(forward, exclude=model)
    loss.backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    counted = {
        "weights": nbytes([*model.parameters(), *model.buffers()]),
        "gradients": nbytes(p.grad for p in trained if p.grad is not None),
        "optimizer": nbytes(states),
        "activations": activations,
    }
    if cuda:  # what the allocator really held at its peak (a measurement, not a count)
        counted["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return counted


def disk_bytes(model: nn.Module, method: Method) -> int:
    """Bytes of what one must ship: the adapter files, or (full fine-tuning) the whole model."""
    with tempfile.TemporaryDirectory() as tmp:
        if method.lora is None:
            path = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            return path.stat().st_size
        directory = save_adapter(model, Path(tmp) / "adapter")
        return sum(f.stat().st_size for f in directory.iterdir())


def run_method(
    base: nn.Module,
    method: Method,
    task,
    steps: int,
    batch_size: int,
    old_task=None,
    every: int = 0,
    data_seed: int = 1,
    seed: int = 0,
) -> dict:
    """Fine-tune a fresh copy of `base` with `method` on `task` and measure it.

    Returns a dict: model, losses (every step), loss (held-out, after training),
    old_loss (held-out loss on `old_task` after training, if given: forgetting),
    trainable and total numbers, disk (bytes), memory (`step_memory`), seconds, and
    if `every` > 0, path: (step, held-out loss, old-task loss) at step 0 and every `every` steps
    (on 128 samples each; the time they take is not in `seconds`).
    """
    torch.manual_seed(seed)  # adapter initialization
    model = method.prepare(base)
    memory = step_memory(model, method, task, batch_size)
    path, spent = [], 0.0

    def checkpoint(step: int) -> None:
        nonlocal spent
        if every and step % every == 0:
            t = time.perf_counter()
            old = None if old_task is None else evaluate(model, old_task, n=128)
            path.append((step, evaluate(model, task, n=128), old))
            spent += time.perf_counter() - t

    checkpoint(0)  # the base model with its fresh adapters
    torch.manual_seed(seed)
    start = time.perf_counter()
    losses = train(
        model,
        task,
        steps=steps,
        lr=method.lr,
        batch_size=batch_size,
        data_seed=data_seed,
        params=method.param_groups(model),
        callback=checkpoint,
    )
    seconds = time.perf_counter() - start - spent
    return dict(
        model=model,
        losses=losses,
        path=path,
        loss=evaluate(model, task, n=1024),
        old_loss=None if old_task is None else evaluate(model, old_task, n=1024),
        disk=disk_bytes(model, method),
        memory=memory,
        seconds=seconds,
        **count_parameters(model),
    )
