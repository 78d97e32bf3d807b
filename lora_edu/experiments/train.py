"""A seeded training loop that returns the loss curve.

Every compared run uses the same data stream (one generator seed), the same
step budget and the same loss, so curves differ only by what is trained. A task
has `sample(batch_size, generator, device)` and `loss(model, batch)`.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from tqdm.auto import tqdm


def train(
    model: nn.Module,
    task,
    steps: int,
    lr: float,
    batch_size: int = 128,
    optimizer: str = "adam",
    data_seed: int = 0,
    params=None,
    desc: str | None = None,
    callback=None,
) -> list[float]:
    """Train `model` on `task` and return the loss at every step.

    Args:
        model: the network; only parameters with requires_grad are trained.
        task: has `sample(batch_size, generator, device)` and `loss(model, batch)`.
        steps: number of optimizer steps.
        lr: learning rate.
        optimizer: "adam" (AdamW without weight decay) or "sgd".
        data_seed: seeds the data stream, identical across compared runs.
        params: parameters or parameter groups to optimize (default: trainable ones).
        desc: label of the progress bar (shown on Colab, hidden when TQDM_DISABLE=1).
        callback: called as callback(step) after every optimizer step (step = 1, 2, ...),
            e.g. to evaluate the model along the way.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    opt = _make_optimizer(optimizer, params, lr)
    gen = torch.Generator().manual_seed(data_seed)
    losses = []
    disable = bool(os.environ.get("TQDM_DISABLE"))
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False, disable=disable):
        loss = task.loss(model, task.sample(batch_size, gen, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step)
    return losses


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, task, n: int = 4096, seed: int = 12345) -> float:
    """The task's loss on `n` fresh samples drawn with a fixed seed (never seen in training)."""
    device = next(model.parameters()).device
    return task.loss(model, task.sample(n, torch.Generator().manual_seed(seed), device)).item()
