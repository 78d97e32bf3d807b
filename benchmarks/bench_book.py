"""6. The book: execution time of each notebook at the quick scale, nbval, the site build.

These are budgets (a notebook must run in about 40 s on 2 cores), so they are
reported as seconds beside their target rather than as ratios.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def notebook_times() -> list[dict]:
    import notebooks as nbtool

    rows = []
    for src in nbtool.sources([]):
        seconds = nbtool.execute(nbtool.from_source(src))
        rows.append(
            {
                "benchmark": "notebook run time (s)",
                "case": src.stem,
                "seconds": seconds,
                "target": 40.0,
                "note": "quick scale, CPU, includes kernel start",
            }
        )
    return rows


def _timed(cmd: list[str], env_extra: dict | None = None) -> float:
    import os

    env = {**os.environ, **(env_extra or {})}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def suite_times() -> list[dict]:
    py = sys.executable
    nb_env = {"TQDM_DISABLE": "1", "LORA_EDU_SCALE": "quick", "CUDA_VISIBLE_DEVICES": ""}
    nbval = _timed(
        [
            py,
            "-m",
            "pytest",
            "--nbval",
            "--nbval-current-env",
            "--nbval-sanitize-with",
            "tests/nbval_sanitize.cfg",
            "notebooks",
            "-q",
        ],
        nb_env,
    )
    build = _timed(
        [str(Path(py).parent / "jupyter-book"), "build", ".", "--warningiserror", "--keep-going"]
    )
    return [
        {"benchmark": "pytest --nbval, all notebooks (s)", "case": "quick", "seconds": nbval,
         "target": None, "note": ""},
        {"benchmark": "jupyter-book build (s)", "case": "incremental", "seconds": build,
         "target": None, "note": ""},
    ]  # fmt: skip
