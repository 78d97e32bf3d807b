"""Experiments of the training-dynamics chapters (4: alpha and r, 5: rsLoRA, 6: LoRA+).

- `lora_student`: a LoRA layer on the frozen W0 of a `LinearShiftTask`, seeded
  (`shift_task_on` moves a task to a GPU).
- `train_lora`: Adam or SGD with separate learning rates for A and B, recording the loss,
  the size of the learned update ||Delta W|| and the gradient norm at every step.
- `first_step_drop`: how much one optimizer step lowers the loss, the "start of training".
- `update_split`: how much one Adam step moves a layer's output through A and through B.
- `pretrained_mlp(width)`: the book's MLP base at any hidden width, pretrained by one
  recipe (`MLP_BASE`), loaded from a stored file when there is one.
- `ShiftedTeacherTask`: fine-tune a pretrained MLP towards a copy of itself whose hidden
  layer got a planted low-rank change, so the adapter must find new input directions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_edu.experiments.mlp import MLP, LinearShiftTask
from lora_edu.experiments.pretrained import (
    DATA_DIR,
    MLP_BASE,
    load_pretrained_mlp,
    pretraining_task,
)
from lora_edu.experiments.runtime import seed_everything
from lora_edu.experiments.train import train
from lora_edu.lora import LoRALinear

__all__ = [
    "ShiftedTeacherTask",
    "first_step_drop",
    "lora_student",
    "make_mlp_base",
    "pretrained_mlp",
    "shift_task_on",
    "train_lora",
    "update_split",
]


def lora_student(
    task: LinearShiftTask, r: int, alpha: float, rslora: bool = False, seed: int = 0
) -> LoRALinear:
    """LoRALinear(r, alpha) on a fresh copy of the task's W0, on W0's device; `seed` draws A.

    A is drawn on the CPU, so the same seed gives the same A on every device; B is zero.
    """
    torch.manual_seed(seed)
    layer = LoRALinear(task.student(), r=r, lora_alpha=alpha, use_rslora=rslora)
    return layer.to(task.w0.device)


def shift_task_on(task: LinearShiftTask, device) -> LinearShiftTask:
    """The same task with W0 and the shift on `device` (a GPU builds targets there)."""
    return LinearShiftTask(task.w0.to(device), task.delta.to(device))


def train_lora(
    layer: LoRALinear,
    task,
    steps: int,
    lr: float,
    lr_ratio: float = 1.0,
    optimizer: str = "adam",
    batch_size: int = 128,
    data_seed: int = 0,
    eps: float = 1e-8,
) -> dict[str, list[float]]:
    """Train one LoRA layer: A with `lr`, B with `lr * lr_ratio` (Adam without decay, or SGD).

    Returns {"loss": [...], "delta_norm": [...], "grad_norm": [...]}: the training loss
    before each step, ||Delta W||_F = ||s B A||_F after it, and the norm of the gradient
    of (A, B) that the step used.
    """
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    groups = [{"params": [a], "lr": lr}, {"params": [b], "lr": lr * lr_ratio}]
    if optimizer == "adam":
        opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, eps=eps)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    gen = torch.Generator().manual_seed(data_seed)
    device = a.device
    out = {"loss": [], "delta_norm": [], "grad_norm": []}
    for _ in range(steps):
        loss = task.loss(layer, task.sample(batch_size, gen, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        out["grad_norm"].append(torch.cat([a.grad.flatten(), b.grad.flatten()]).norm().item())
        opt.step()
        out["loss"].append(loss.item())
        out["delta_norm"].append(layer.delta_weight().norm().item())
    return out


def first_step_drop(
    task, layer: LoRALinear, lr: float, optimizer: str = "adam", batch_size: int = 256, probe=None
) -> float:
    """Relative loss decrease after one training step, (L0 - L1) / L0, on one probe batch.

    `probe` defaults to 4096 fresh samples; pass one batch to compare many layers cheaply.
    """
    device = layer.lora_A["default"].weight.device
    if probe is None:
        probe = task.sample(4096, torch.Generator().manual_seed(12345), device)
    with torch.no_grad():
        before = task.loss(layer, probe).item()
    train_lora(layer, task, steps=1, lr=lr, optimizer=optimizer, batch_size=batch_size)
    with torch.no_grad():
        after = task.loss(layer, probe).item()
    return (before - after) / before


def update_split(
    model: nn.Module,
    task,
    layer: str,
    lr: float,
    ratio: float = 1.0,
    steps: int = 1,
    batch_size: int = 128,
    data_seed: int = 0,
    probe=None,
) -> tuple[float, float]:
    """How much one Adam step moves a LoRA layer's output through A, and through B.

    Trains the model's LoRA factors for `steps` steps (A at `lr`, B at `lr * ratio`, as
    LoRA+), then takes one more step and returns (delta_A, delta_B): the RMS over the
    probe inputs x of the layer of s B (A' - A) x and of s (B' - B) A x (LoRA+ paper,
    Sec. 3: efficient learning needs both to be of order 1).
    """
    from lora_edu.loraplus import loraplus_param_groups

    lora = model.get_submodule(layer)
    a, b, s = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
    opt = torch.optim.AdamW(loraplus_param_groups(model, lr, ratio), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(data_seed)
    device = a.device
    for _ in range(steps + 1):
        a0, b0 = a.detach().clone(), b.detach().clone()  # (r, in), (out, r)
        loss = task.loss(model, task.sample(batch_size, gen, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seen = []
    hook = lora.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(probe[0] if probe is not None else task.sample(1024, gen, device)[0])
        hook.remove()
        x = seen[0]  # (batch, in): what the layer reads
        via_a = s * (x @ (a - a0).T) @ b0.T  # (batch, out)
        via_b = s * (x @ a0.T) @ (b - b0).T  # (batch, out)
    return via_a.pow(2).mean().sqrt().item(), via_b.pow(2).mean().sqrt().item()


def _base_file(width: int) -> Path:
    return DATA_DIR / f"mlp_base_w{width}.safetensors"


def make_mlp_base(width: int, device="cpu", save: bool = False) -> MLP:
    """Pretrain an MLP 32 -> width -> width -> 32 with the recipe of the book's base (`MLP_BASE`).

    Deterministic for a given device, torch build and thread count. With `save=True` it is
    written to lora_edu/experiments/data/mlp_base_w{width}.safetensors (keep those < 1 MB).
    """
    seed_everything(0)
    dims = {**MLP_BASE["dims"], "d_hidden": width}
    model = MLP(**dims).to(device)
    recipe = {k: MLP_BASE[k] for k in ("steps", "lr", "batch_size")}
    train(model, pretraining_task(), data_seed=0, desc=f"pretrain width {width}", **recipe)
    if save:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(_base_file(width)))
    return model


def pretrained_mlp(width: int, device="cpu") -> MLP:
    """The MLP base of hidden width `width`: the book's stored base for 256, a stored
    `mlp_base_w{width}` file when there is one, else pretrained now (seconds on a GPU)."""
    if width == MLP_BASE["dims"]["d_hidden"]:
        return load_pretrained_mlp(device)
    path = _base_file(width)
    if not path.exists():
        return make_mlp_base(width, device)
    model = MLP(**{**MLP_BASE["dims"], "d_hidden": width})
    model.load_state_dict(load_file(str(path)))
    return model.to(device)


class ShiftedTeacherTask:
    """Regress a copy of `base` whose layer `layer` got a planted rank-`rank` change.

    The change U V^T has random orthonormal U, V, scaled so that the base model's loss on
    the task is `base_loss` at every width. A LoRA adapter on that layer can reach loss 0,
    but only if its A turns towards V's directions: the adapter has to learn features.
    """

    def __init__(
        self,
        base: nn.Module,
        layer: str = "fc2",
        rank: int = 4,
        base_loss: float = 0.05,
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.teacher = copy.deepcopy(base).requires_grad_(False)
        weight = self.teacher.get_submodule(layer).weight  # (d_out, d_in)
        d_out, d_in = weight.shape
        u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))  # (d_out, rank)
        v, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g))  # (d_in, rank)
        delta = (u @ v.T).to(weight.device)  # (d_out, d_in), ||delta||_F = sqrt(rank)
        self.d_in = base.fc1.in_features
        with torch.no_grad():
            w0, size = weight.clone(), 1.0
            for _ in range(3):  # the loss grows about like size^2: rescale until it is base_loss
                weight.copy_(w0 + size * delta)
                size *= (base_loss / self.loss(base, self.probe())) ** 0.5
            weight.copy_(w0 + size * delta)
        self.delta = size * delta  # the planted change Delta W*

    def probe(self, n: int = 4096, seed: int = 12345):
        """A fixed batch of fresh samples (never seen in training)."""
        device = next(self.teacher.parameters()).device
        return self.sample(n, torch.Generator().manual_seed(seed), device)

    def sample(self, batch_size: int, generator: torch.Generator, device="cpu"):
        """A batch (x, teacher(x)) with standard normal x drawn with `generator`."""
        x = torch.randn(batch_size, self.d_in, generator=generator).to(device)
        with torch.no_grad():
            return x, self.teacher(x)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Mean squared error of the model's output against the teacher's."""
        x, y = batch
        return nn.functional.mse_loss(model(x), y)
