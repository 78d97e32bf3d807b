"""Timing helpers for the benchmarks: every claim is a ratio measured in one run.

`paired_ratio` times two functions in interleaved pairs (a, b, a, b, ...) after a
warm-up, so slow drifts of the machine (frequency, other load) hit both alike,
and reports the median of the per-pair ratios with its spread.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def _time_once(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired_ratio(fn_a, fn_b, repeats: int = 7, warmup: int = 2) -> dict:
    """Median and spread (min, max) of time(fn_a) / time(fn_b) over interleaved pairs."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ratios = []
    for i in range(repeats):
        if i % 2:  # alternate the order inside a pair as well
            tb, ta = _time_once(fn_b), _time_once(fn_a)
        else:
            ta, tb = _time_once(fn_a), _time_once(fn_b)
        ratios.append(ta / tb)
    return {
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "repeats": repeats,
    }


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
