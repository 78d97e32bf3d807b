"""The benchmarks' smoke version: every measurement runs and yields a sane ratio (they cannot rot)."""

import math

from benchmarks import run


def test_smoke_benchmarks_give_finite_ratios_and_check_their_references():
    rows = run.collect(smoke=True)
    names = {r["benchmark"] for r in rows}
    assert {"LoRALinear fwd+bwd / PEFT", "LoRA step / frozen floor",
            "merged LoRA forward / nn.Linear", "quantize_4bit / bitsandbytes",
            "Linear4bit forward / nn.Linear"} <= names  # fmt: skip
    for row in rows:
        assert math.isfinite(row["ratio"]) and 0 < row["min"] <= row["ratio"] <= row["max"]
    notes = " ".join(r["note"] for r in rows)
    assert "codes identical: True" in notes and "max output diff 0.0e+00" in notes


def test_table_marks_targets_met_and_missed():
    rows = [
        {
            "benchmark": "a",
            "case": "x",
            "ratio": 1.0,
            "min": 1,
            "max": 1,
            "target": 1.05,
            "note": "",
        },
        {
            "benchmark": "b",
            "case": "y",
            "ratio": 2.0,
            "min": 2,
            "max": 2,
            "target": 1.05,
            "note": "",
        },
        {"benchmark": "c", "case": "z", "seconds": 3.0, "target": None, "note": ""},
    ]
    info = {"cpu": "cpu", "cores": 2, "threads": 2, "torch": "t", "date": "d"}
    lines = run.markdown(rows, info).splitlines()
    assert lines[-3].endswith("| meets target |") and lines[-2].endswith("| MISSES target |")
    assert "3.0 s" in lines[-1]
