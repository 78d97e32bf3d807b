"""Load every page of the built book in real headless Chromium and check it as a reader would.

Fails on: a page of the table of contents that was not built, a JavaScript error,
a request that leaves the machine, unrendered or erroneous TeX, a broken image,
a broken internal link (file or anchor), an empty widget or output area, and a
search page that finds nothing for "rank". Screenshots go to `_build/screens/`.

    python tests/site/check_site.py _build/html
"""

from __future__ import annotations

import functools
import http.server
import re
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import yaml
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Known, harmless console messages (FACTS.md): the theme's mode reset and the favicon 404.
ALLOWED_CONSOLE = [re.compile(r"Got invalid theme mode"), re.compile(r"favicon\.ico")]
WIDTHS = {"desktop": (1280, 900), "phone": (390, 844)}
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$|\\frac|\\mathbb|\\Delta|\\sigma")

PAGE_PROBE = """() => {
  const visible = (el) => !el.closest('pre, code, script, style, .highlight, mjx-container, .MathJax');
  const texts = [];
  const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) { const n = walker.currentNode; if (visible(n.parentElement)) texts.push(n.textContent); }
  const mathEls = [...document.querySelectorAll('.math')];
  return {
    text: texts.join(' '),
    math: mathEls.length,
    mathUnrendered: mathEls.filter(e => !e.querySelector('mjx-container')).length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
    brokenImages: [...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src),
    widgets: document.querySelectorAll('.jupyter-widgets, .widget-area, script[type*="jupyter.widget"]').length,
    emptyOutputs: [...document.querySelectorAll('.cell_output')].filter(
        e => !e.innerText.trim() && !e.querySelector('img, table, svg, iframe')).length,
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
  };
}"""


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `directory` on a free loopback port in a background thread."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # the browser closed a connection early
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the check's output readable
        pass


def toc_pages(site: Path) -> list[str]:
    """Every page named in _toc.yml, as a path relative to the site root."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for ch in part.get("chapters", []):
            files.append(ch["file"])
            files.extend(s["file"] for s in ch.get("sections", []))
    return [f + ".html" for f in files]


def check_page(page, base: str, rel: str, site: Path, shots: Path, width: str) -> list[str]:
    problems, console = [], []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    response = page.goto(base + rel, wait_until="load")
    if response is None or response.status >= 400:
        return [f"{rel}: HTTP {response.status if response else 'no response'}"]
    page.evaluate("() => window.MathJax && MathJax.startup && MathJax.startup.promise")
    page.wait_for_timeout(300)
    probe = page.evaluate(PAGE_PROBE)
    errors = [c for c in console if not any(a.search(c) for a in ALLOWED_CONSOLE)]
    problems += [f"{rel}: console error: {c}" for c in errors]
    if probe["mathUnrendered"] or probe["mathErrors"]:
        problems.append(
            f"{rel}: {probe['mathUnrendered']} unrendered and {probe['mathErrors']} erroneous math"
        )
    if RAW_TEX.search(probe["text"]):
        problems.append(
            f"{rel}: raw TeX in the text: ...{RAW_TEX.search(probe['text']).group()}..."
        )
    problems += [f"{rel}: broken image {src}" for src in probe["brokenImages"]]
    if probe["widgets"]:
        problems.append(f"{rel}: {probe['widgets']} widget areas (the site cannot run them)")
    if probe["emptyOutputs"]:
        problems.append(f"{rel}: {probe['emptyOutputs']} empty output areas")
    problems += check_links(probe["links"], base, rel, site)
    name = rel.replace("/", "__").removesuffix(".html")
    page.screenshot(path=str(shots / f"{name}.{width}.png"), full_page=True)
    return problems


@functools.cache
def ids_of(path: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', path.read_text(errors="replace")))


def check_links(links: list[str], base: str, rel: str, site: Path) -> list[str]:
    """Every link that stays on the site points to a built file and an existing anchor."""
    problems = []
    for link in links:
        if not link.startswith(base):
            continue
        url = urlparse(link)
        target = site / unquote(url.path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"{rel}: broken link to {url.path}")
        elif (
            url.fragment
            and target.suffix == ".html"
            and unquote(url.fragment) not in ids_of(target)
        ):
            problems.append(f"{rel}: link to a missing anchor {url.path}#{url.fragment}")
    return problems


def check_search(page, base: str) -> list[str]:
    page.goto(urljoin(base, "search.html?q=rank"), wait_until="load")
    try:
        page.wait_for_selector("#search-results ul.search li", timeout=15000)
    except Exception:
        return ["search.html: searching for 'rank' found nothing"]
    return []


def check_site(site: Path, pages: list[str], search: bool = True) -> list[str]:
    """Every problem found on `pages` (paths relative to `site`), at each width."""
    shots = site.parent / "screens"
    shots.mkdir(parents=True, exist_ok=True)
    problems = [f"{p}: page in _toc.yml was not built" for p in pages if not (site / p).exists()]
    server, base = serve(site)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for width, (w, h) in WIDTHS.items():
            context = browser.new_context(viewport={"width": w, "height": h})
            outside: list[str] = []
            context.route("**/*", functools.partial(_only_local, outside=outside))
            for rel in [p for p in pages if (site / p).exists()]:
                page = context.new_page()
                problems += check_page(page, base, rel, site, shots, width)
                page.close()
            if search:
                problems += check_search(context.new_page(), base)
            problems += [f"request left the machine ({width}): {u}" for u in outside]
            context.close()
        browser.close()
    server.shutdown()
    return sorted(set(problems))


def main(site_dir: str) -> int:
    site = Path(site_dir).resolve()
    pages = toc_pages(site)
    problems = check_site(site, pages)
    for line in problems:
        print("FAIL", line)
    print(
        f"site check: {len(pages)} pages x {len(WIDTHS)} widths, {len(problems)} problems; "
        f"screenshots in {site.parent / 'screens'}"
    )
    return 1 if problems else 0


def _only_local(route, request=None, *, outside: list[str]) -> None:
    host = urlparse(route.request.url).hostname
    if host in ("127.0.0.1", "localhost") or route.request.url.startswith("data:"):
        route.continue_()
    else:
        outside.append(route.request.url)
        route.abort()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "_build/html"))
