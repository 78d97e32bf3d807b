"""The notebooks as stored: in sync with their sources, stamped, and following the conventions.

nbval (run separately by `make test`) re-executes them and compares every output.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import notebooks as nbtool  # noqa: E402
from lora_edu.widgets import WIDGET_MARK  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


def _read(path):
    return nbformat.read(path, as_version=4)


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [ch["file"] for part in toc["parts"] for ch in part["chapters"]]


def test_every_source_has_a_stored_notebook_and_they_agree():
    sources = nbtool.sources([])
    assert sources, "no notebook sources found"
    assert {s.stem for s in sources} == {p.stem for p in NOTEBOOKS}
    problems = [p for s in sources for p in nbtool.check(s)]
    assert not problems, "run `make notebooks`:\n" + "\n".join(problems)


def test_every_notebook_is_in_the_table_of_contents():
    in_toc = {f for f in _toc_files() if f.startswith("notebooks/")}
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} <= in_toc


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_repository_url_from_config_is_stamped_into_badge_and_install_cell(path):
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    nb = _read(path)
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    assert nbtool.colab_link(path.name) in first_md.source
    assert url.startswith("https://github.com/") and url.removeprefix(
        "https://github.com/"
    ) in nbtool.colab_link(path.name)
    install = next(c for c in nb.cells if c.cell_type == "code")
    assert f'REPO_URL = "{url}"' in install.source
    assert "google.colab" in install.source and "git+{REPO_URL}" in install.source
    assert "torch" not in install.source.split("%pip", 1)[1].split("\n")[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_chapter_conventions(path):
    nb = _read(path)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    first = next(c for c in nb.cells if c.cell_type == "markdown").source
    assert first.startswith("# "), "first cell starts with the title"
    for needed in ["Open in Colab", "You will learn", "You should know", "Runtime"]:
        assert needed in first, f"first cell lacks {needed!r}"
    assert "Key takeaways" in md
    assert md.count("{dropdown} Solution") >= 3, "at least 3 exercises with solutions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_outputs_are_complete_png_only_and_free_of_progress_bars(path):
    nb = _read(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom"
    assert "widgets" not in nb.metadata, "saved widget state would make the site load CDN scripts"
    for cell in code:
        streams = [o.get("name") if o.output_type == "stream" else None for o in cell.outputs]
        assert all(a is None or a != b for a, b in zip(streams, streams[1:])), (
            f"consecutive stream outputs in {cell.id}: run `make notebooks`"
        )
        for out in cell.outputs:
            assert out.output_type != "error", f"error stored in cell {cell.id}"
            data = out.get("data", {})
            assert "image/svg+xml" not in data, "figures are PNG only"
            text = out.get("text", "") + data.get("text/plain", "")
            assert not re.search(r"\d+%\|", text), f"progress bar stored in cell {cell.id}"
            assert out.get("name") != "stderr", f"stderr stored in cell {cell.id}: {text[:200]}"
            for line in re.findall(r"\[time\][^\n]*", text):  # timings vary: not stored
                assert line == nbtool.TIME_STORED, f"a measured time is stored in {cell.id}"
            assert WIDGET not in data, "widget views are stored as text only (no model id)"
        texts = [o.get("data", {}).get("text/plain", "") for o in cell.outputs]
        if any(t.endswith(WIDGET_MARK) for t in texts):  # a lora_edu widget
            assert "remove-output" in cell.metadata.get("tags", []), (
                "a widget output is removed from the site (its static figure stands beside it)"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_glued_number_in_the_prose_is_glued_by_a_cell(path):
    nb = _read(path)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    wanted = set(re.findall(r"\{glue:\w+\}`([\w]+)", md))
    glued = set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            glued.update(k["name"] for k in [out.get("metadata", {}).get("scrapbook", {})] if k)
    assert wanted and wanted <= glued, f"not glued: {sorted(wanted - glued)}"


def test_installing_lora_edu_never_touches_an_installed_torch():
    """What the Colab cell does: pip must find nothing to install but lora-edu itself."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--report",
            "-",
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    names = [item["metadata"]["name"] for item in report["install"]]
    assert names == ["lora-edu"]
