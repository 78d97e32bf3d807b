"""Seeds, device and scale: the three knobs every notebook sets in its first cells.

The scale picks an experiment's size: "quick" runs each notebook in well under a
minute on 2 CPU cores, "full" is sized for a Colab GPU. It is "full" when CUDA is
available and "quick" otherwise; the environment variable LORA_EDU_SCALE overrides.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

SCALES = ("quick", "full")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with one number."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device() -> torch.device:
    """`cuda` when a GPU is available, else `cpu`."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_scale(device: torch.device | None = None) -> str:
    """The experiment scale: LORA_EDU_SCALE if set, else "full" on CUDA and "quick" on CPU."""
    env = os.environ.get("LORA_EDU_SCALE", "").strip().lower()
    if env:
        if env not in SCALES:
            raise ValueError(f"LORA_EDU_SCALE must be one of {SCALES}, got {env!r}")
        return env
    device = device or get_device()
    return "full" if device.type == "cuda" else "quick"


@dataclass(frozen=True)
class Runtime:
    """Where and how big the experiments of a notebook run."""

    device: torch.device  # cuda when available
    scale: str  # "quick" or "full"
    seed: int  # the seed set by `setup`

    def pick(self, quick, full):
        """Return `quick` or `full` according to the scale."""
        return quick if self.scale == "quick" else full


def setup(seed: int = 0, threads: int = 2, verbose: bool = True) -> Runtime:
    """Seed everything, fix CPU threads for reproducible numbers, pick device and scale."""
    device = get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # stored outputs were made with 2 threads
    seed_everything(seed)
    rt = Runtime(device=device, scale=get_scale(device), seed=seed)
    if verbose:
        print(f"device: {rt.device.type} | scale: {rt.scale} | seed: {seed}")
    return rt
