"""A small MLP and teacher-student regression tasks with a known ground truth.

The student is an ordinary `nn.Module` of `nn.Linear` layers (`fc1`, `fc2`, `fc3`).
A task is a frozen random "teacher" network; inputs are standard normal and the
target is the teacher's output, so the best possible loss is exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """x -> fc1 -> GELU -> fc2 -> GELU -> fc3: a 3-layer perceptron."""

    def __init__(self, d_in: int = 32, d_hidden: int = 256, d_out: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.fc3 = nn.Linear(d_hidden, d_out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))  # (batch, d_out)


class TeacherTask:
    """Regress the output of a frozen random tanh network (the teacher).

    Args:
        d_in, d_out: input and output sizes (match the student).
        d_hidden: the teacher's hidden width.
        seed: makes the teacher's weights.
    """

    def __init__(self, d_in: int = 32, d_out: int = 32, d_hidden: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.d_in, self.d_out = d_in, d_out
        self.w1 = torch.randn(d_hidden, d_in, generator=g) / d_in**0.5  # (h, d_in)
        self.w2 = torch.randn(d_out, d_hidden, generator=g) / d_hidden**0.5  # (d_out, h)

    def with_new_skill(self, width: int, weight: float = 0.5, seed: int = 7) -> SumTask:
        """A fine-tuning task: this teacher plus `weight` times a fresh teacher of `width` units.

        The fresh teacher is a new skill whose size (hidden width) we choose; nothing
        constrains the rank of the weight update a student needs to learn it.
        """
        skill = TeacherTask(self.d_in, self.d_out, d_hidden=width, seed=seed)
        return SumTask([self, skill], [1.0, weight])

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's output for inputs x of shape (batch, d_in)."""
        h = torch.tanh(x @ self.w1.T.to(x.device))  # (batch, h)
        return h @ self.w2.T.to(x.device)  # (batch, d_out)

    def sample(self, batch_size: int, generator: torch.Generator, device="cpu"):
        """A batch (x, y) drawn with `generator` (inputs standard normal)."""
        x = torch.randn(batch_size, self.d_in, generator=generator).to(device)
        return x, self.target(x)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Mean squared error of the model's output against the teacher's."""
        x, y = batch
        return nn.functional.mse_loss(model(x), y)


class SumTask(TeacherTask):
    """A weighted sum of teachers: target(x) = sum_i weight_i * teacher_i(x)."""

    def __init__(self, teachers: list[TeacherTask], weights: list[float]):
        self.teachers, self.weights = teachers, weights
        self.d_in, self.d_out = teachers[0].d_in, teachers[0].d_out

    def target(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * t.target(x) for t, w in zip(self.teachers, self.weights))


class LinearShiftTask:
    """A "pretrained" linear layer W0 and a target W0 + delta whose change is known.

    The student is `task.student()`, an nn.Linear holding W0; its loss on a batch is
    the mean squared error against x @ (W0 + delta).T for standard normal x. With
    `low_rank(...)` the shift has exactly rank k; with `decaying(...)` it is full
    rank with singular values falling as i^-power, so more rank always helps a bit.
    """

    def __init__(self, w0: torch.Tensor, delta: torch.Tensor):
        self.w0, self.delta = w0, delta  # (d_out, d_in) each
        self.d_out, self.d_in = w0.shape

    @classmethod
    def low_rank(cls, d_out: int, d_in: int, rank: int, seed: int = 0) -> LinearShiftTask:
        """delta = U V^T of exactly `rank`, with ||delta||_F equal to ||W0||_F / 4."""
        g = torch.Generator().manual_seed(seed)
        w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        delta = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
        return cls(w0, delta * (w0.norm() / 4 / delta.norm()))

    @classmethod
    def decaying(cls, d_out: int, d_in: int, power: float = 1.0, seed: int = 0) -> LinearShiftTask:
        """Full-rank delta with singular values proportional to i^-power, ||delta|| = ||W0|| / 4."""
        g = torch.Generator().manual_seed(seed)
        w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        n = min(d_out, d_in)
        u, _ = torch.linalg.qr(torch.randn(d_out, n, generator=g))  # (d_out, n)
        v, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g))  # (d_in, n)
        s = torch.arange(1, n + 1, dtype=torch.float32) ** -power  # (n,)
        delta = (u * s) @ v.T  # (d_out, d_in)
        return cls(w0, delta * (w0.norm() / 4 / delta.norm()))

    def student(self) -> nn.Linear:
        """A fresh nn.Linear (no bias) holding W0: the model to fine-tune."""
        layer = nn.Linear(self.d_in, self.d_out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(self.w0)
        return layer

    def sample(self, batch_size: int, generator: torch.Generator, device="cpu"):
        x = torch.randn(batch_size, self.d_in, generator=generator).to(device)
        return x, x @ (self.w0 + self.delta).T.to(device)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    def best_loss(self, rank: int) -> float:
        """Lowest expected loss of W0 + (any rank-`rank` update): Eckart-Young on delta."""
        s = torch.linalg.svdvals(self.delta)
        return float(s[rank:].pow(2).sum() / self.d_out)
