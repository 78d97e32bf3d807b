"""Synthetic sequence tasks with a known answer, for the tiny LLaMA.

A sequence is `x SEP y`: a random string x of `n` symbols, a separator, and the
answer y, a fixed function of x. The model predicts every next token; the loss
counts only the answer tokens, so a perfect model reaches zero loss.

- "copy":    y = x              (the pretraining task: attend back n+1 positions)
- "reverse": y = x reversed     (same symbols, a new attention pattern)
- "shift":   y = x + 1 mod V    (same attention, a new symbol mapping)

A task may use another separator token (`sep`, one of the vocabulary's unused
tokens 33..39): the separator then says which task to do, so a model can learn a
new task without having to unlearn copying (chapter 10 measures forgetting so).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

N_SYMBOLS = 32  # symbols 0..31; token 32 is the separator
SEP = N_SYMBOLS
SPARE_SEPS = range(N_SYMBOLS + 1, 40)  # tokens the tiny LLaMA's vocabulary has and no task uses
TASKS = ("copy", "reverse", "shift")


def answer(x: torch.Tensor, task: str) -> torch.Tensor:
    """The answer y for strings x (batch, n)."""
    if task == "copy":
        return x
    if task == "reverse":
        return x.flip(-1)
    if task == "shift":
        return (x + 1) % N_SYMBOLS
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class SequenceTask:
    """Next-token prediction on `x SEP answer(x)`; loss on the answer tokens only.

    Args:
        task: "copy", "reverse" or "shift".
        n: length of the string x (the sequence has 2n + 1 tokens).
        sep: the separator token: 32, or a spare token 33..39 that marks this task.
    """

    def __init__(self, task: str = "copy", n: int = 12, sep: int = SEP):
        answer(torch.zeros(1, 1, dtype=torch.long), task)  # validates the name
        if sep != SEP and sep not in SPARE_SEPS:
            raise ValueError(f"sep must be {SEP} or a spare token 33..39, got {sep!r}")
        self.task, self.n, self.sep = task, n, sep

    def sample(self, batch_size: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
        """A batch of full sequences (batch, 2n + 1)."""
        x = torch.randint(0, N_SYMBOLS, (batch_size, self.n), generator=generator)
        sep = torch.full((batch_size, 1), self.sep)
        return torch.cat([x, sep, answer(x, self.task)], 1).to(device)

    def loss(self, model, seq: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the answer tokens given everything before them."""
        logits = model(seq[:, :-1])  # (batch, 2n, vocab)
        answer_logits = logits[:, self.n :]  # positions SEP .. end-1 predict the answer
        return F.cross_entropy(
            answer_logits.reshape(-1, logits.shape[-1]), seq[:, self.n + 1 :].reshape(-1)
        )

    @torch.no_grad()
    def accuracy(self, model, seq: torch.Tensor) -> float:
        """Share of answer tokens predicted exactly (greedy, teacher-forced)."""
        pred = model(seq[:, :-1])[:, self.n :].argmax(-1)
        return (pred == seq[:, self.n + 1 :]).float().mean().item()
