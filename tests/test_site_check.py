"""The browser check itself: a page with each kind of defect must be reported (real Chromium)."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "site"))
import check_site  # noqa: E402

pytestmark = pytest.mark.skipif(
    not Path(check_site.CHROMIUM).exists(), reason="make test installs chromium first"
)

BAD_PAGE = """<!doctype html><html><body><main>
<p>Unrendered math: \\(\\frac{a}{b}\\)</p>
<a href="missing.html">a broken link</a>
<a href="good.html#nowhere">a broken anchor</a>
<img src="http://192.0.2.1/outside.png">
<div class="cell_output"></div>
<script type="application/vnd.jupyter.widget-view+json">{"model_id": "x"}</script>
<script>throw new Error("boom")</script>
</main></body></html>"""

GOOD_PAGE = """<!doctype html><html><body><main><h1 id="top">Fine</h1>
<a href="good.html#top">an anchor that exists</a><p>Plain text and $5.</p></main></body></html>"""


def test_each_defect_on_a_page_is_reported(tmp_path):
    site = tmp_path / "html"
    site.mkdir()
    (site / "bad.html").write_text(BAD_PAGE)
    (site / "good.html").write_text(GOOD_PAGE)
    problems = "\n".join(check_site.check_site(site, ["bad.html", "good.html"], search=False))
    for expected in [
        "raw TeX",
        "broken link to /missing.html",
        "missing anchor /good.html#nowhere",
        "request left the machine",
        "empty output areas",
        "widget areas",
        "console error: page error: boom",
    ]:
        assert expected in problems, f"not reported: {expected}\n{problems}"
    assert "good.html:" not in problems
    shutil.rmtree(tmp_path / "screens")


def test_a_page_listed_but_not_built_is_reported(tmp_path):
    site = tmp_path / "html"
    site.mkdir()
    problems = check_site.check_site(site, ["chapter.html"], search=False)
    assert problems == ["chapter.html: page in _toc.yml was not built"]
