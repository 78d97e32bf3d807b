"""Run the benchmarks, print a table of ratios, write results.json and the appendix table.

python -m benchmarks.run            # everything (several minutes on 2 cores)
python -m benchmarks.run --smoke    # tiny shapes, nothing written: checks the code runs
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from benchmarks import bench_book, bench_lora, bench_quant
from benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
TABLE = ROOT / "book" / "_generated" / "benchmarks.md"


def collect(smoke: bool) -> list[dict]:
    if smoke:
        small = dict(repeats=2)
        return (bench_lora.lora_vs_peft(dims=(64,), ranks=(4,), tokens=32, **small)
                + bench_lora.step_vs_floor(d=64, r=4, tokens=32, **small)
                + bench_lora.merged_inference(d=64, r=4, tokens=32, **small)
                + bench_quant.quantize_vs_bnb(d=128, **small)
                + bench_quant.linear4bit_forward(d=64, tokens=32, **small))  # fmt: skip
    return (bench_lora.lora_vs_peft() + bench_lora.step_vs_floor() + bench_lora.merged_inference()
            + bench_quant.quantize_vs_bnb() + bench_quant.linear4bit_forward()
            + bench_book.notebook_times() + bench_book.suite_times())  # fmt: skip


def verdict(row: dict) -> str:
    value = row.get("ratio", row.get("seconds"))
    if row.get("target") is None:
        return ""
    return "meets target" if value <= row["target"] else "MISSES target"


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"Measured on {info['cpu']} ({info['cores']} cores, {info['threads']} torch threads), "
        f"torch {info['torch']}, on {info['date']}.",
        "",
        "| benchmark | case | value | spread | target | |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "ratio" in row:
            value, spread = f"{row['ratio']:.2f}x", f"{row['min']:.2f}-{row['max']:.2f}"
        else:
            value, spread = f"{row['seconds']:.1f} s", ""
        target = "" if row["target"] is None else f"<= {row['target']:g}"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(
            f"| {row['benchmark']} | {row['case']}{note} | {value} | {spread} | "
            f"{target} | {verdict(row)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; write nothing")
    args = parser.parse_args()
    rows = collect(args.smoke)
    info = {**machine(), "date": datetime.date.today().isoformat()}
    table = markdown(rows, info)
    print(table)
    if not args.smoke:
        RESULTS.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(table)
        print(f"wrote {RESULTS.relative_to(ROOT)} and {TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
