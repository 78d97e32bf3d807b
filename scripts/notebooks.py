"""Build the book's notebooks from their sources and store their outputs.

Each chapter is written as a MyST markdown notebook in `notebooks/src/NN_topic.md`
(readable diffs); this script turns it into `notebooks/NN_topic.ipynb`, stamps the
repository URL from `_config.yml` into the Colab badge and install cell, executes
it at the quick scale on the CPU, and writes it with normalized metadata so that
running it twice gives identical files.

    python scripts/notebooks.py            # every notebook
    python scripts/notebooks.py 01 03      # only those whose name starts with 01 or 03
    python scripts/notebooks.py --check    # only check that sources and .ipynb agree
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import jupytext
import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "notebooks" / "src"
OUT = ROOT / "notebooks"

# The environment stored outputs are made in (nbval runs in the same one).
EXEC_ENV = {
    "TQDM_DISABLE": "1",
    "LORA_EDU_SCALE": "quick",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONHASHSEED": "0",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
}
REPO_LINE = re.compile(r'^REPO_URL = ".*"$', re.M)
# Timings vary run to run: the stored notebook says so instead of storing one (identical files).
TIME_LINE = re.compile(r"\[time\][^\n]*")
TIME_STORED = "[time] (measured when you run this cell; see the performance appendix)"
COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s\"]+")


def book_repository() -> dict:
    """The `repository` section of `_config.yml` (url and branch)."""
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]


def colab_link(name: str) -> str:
    """The Colab address of notebook `name` (e.g. "01_rank_and_svd.ipynb")."""
    repo = book_repository()
    slug = repo["url"].rstrip("/").removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{slug}/blob/{repo['branch']}/notebooks/{name}"


def stamp(nb: nbformat.NotebookNode, name: str) -> None:
    """Write the repository URL into the install cell and the Colab badge."""
    url = book_repository()["url"]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = REPO_LINE.sub(f'REPO_URL = "{url}"', cell.source)
        else:
            cell.source = COLAB_LINK.sub(colab_link(name), cell.source)


def from_source(src: Path) -> nbformat.NotebookNode:
    """Read a MyST-markdown notebook and give it stable cell ids and metadata."""
    nb = jupytext.read(src)
    stamp(nb, src.stem + ".ipynb")
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, cell in enumerate(nb.cells):
        cell.id = f"{src.stem[:2]}-{i:03d}"
        cell.metadata.pop("execution", None)
    return nb


def execute(nb: nbformat.NotebookNode) -> float:
    """Run the notebook in place (quick scale, CPU); returns seconds taken."""
    from nbclient import NotebookClient

    os.environ.update(EXEC_ENV)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(OUT)}}
    )
    start = time.perf_counter()
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    normalize_outputs(nb)
    nb.metadata.pop("widgets", None)  # no saved widget state: the site loads no widget JS
    return time.perf_counter() - start


def normalize_outputs(nb: nbformat.NotebookNode) -> None:
    """Merge stream chunks, replace timing lines, drop widget views (random model ids)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = merge_streams(cell.outputs)
        for out in cell.outputs:
            if out.output_type == "stream":
                out.text = TIME_LINE.sub(TIME_STORED, out.text)
            # Widget views point at a random model id and no state is saved: keep their text.
            out.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)


def merge_streams(outputs: list) -> list:
    """Join consecutive stdout (or stderr) chunks: how a kernel splits them depends on timing."""
    merged = []
    for out in outputs:
        prev = merged[-1] if merged else None
        if (
            out.output_type == "stream"
            and prev is not None
            and prev.output_type == "stream"
            and prev.name == out.name
        ):
            prev.text += out.text
        else:
            merged.append(out)
    return merged


def sources(prefixes: list[str]) -> list[Path]:
    srcs = sorted(SRC.glob("[0-9][0-9]_*.md"))
    return [s for s in srcs if not prefixes or any(s.name.startswith(p) for p in prefixes)]


def check(src: Path) -> list[str]:
    """Differences between a source and its stored .ipynb (cell types, sources, metadata)."""
    target = OUT / (src.stem + ".ipynb")
    if not target.exists():
        return [f"{target.name} is missing: run `make notebooks`"]
    want, have = from_source(src), nbformat.read(target, as_version=4)
    problems = []
    if len(want.cells) != len(have.cells):
        problems.append(f"{target.name}: {len(have.cells)} cells, source has {len(want.cells)}")
    for i, (a, b) in enumerate(zip(want.cells, have.cells)):
        if (a.cell_type, a.source, a.metadata) != (b.cell_type, b.source, b.metadata):
            problems.append(f"{target.name}: cell {i} differs from {src.name}")
    return problems


def main(argv: list[str]) -> int:
    only_check = "--check" in argv
    srcs = sources([a for a in argv if not a.startswith("--")])
    if only_check:
        problems = [p for s in srcs for p in check(s)]
        print("\n".join(problems) or f"{len(srcs)} notebooks agree with their sources")
        return 1 if problems else 0
    for src in srcs:
        nb = from_source(src)
        seconds = execute(nb)
        nbformat.write(nb, OUT / (src.stem + ".ipynb"))
        print(f"{src.stem}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
