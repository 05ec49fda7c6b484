"""The book's website: built offline from the chapters, every asset local, and read in a real browser."""

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

pytest.importorskip("sphinx", reason="the site needs the [book] extra")
pytest.importorskip("myst_nb", reason="the site needs the [book] extra")
import build_book  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_site_builds_with_every_asset_local(tmp_path):
    index = build_book.build_site(build_book.chapters(), tmp_path / "site")
    site = index.parent
    pages = {p.name for p in (site / "chapters").glob("*.html")}
    assert pages == {c.with_suffix(".html").name for c in build_book.chapters()}
    for page in ("notation.html", "references.html", "search.html"):
        assert (site / page).exists(), page
    assert build_book.external_references(site) == []
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()  # MathJax served by the site itself
    html = (site / "chapters" / "05_ppo.html").read_text()
    assert "05_ppo.ipynb" in html  # the download button's notebook
    assert 'href="04_value_loss.html"' in html and 'href="../references.html"' in html  # previous / appendix links
    assert "Chapter 1" in index.read_text() and "pipeline.svg" in index.read_text()


def test_external_references_are_found(tmp_path):
    (tmp_path / "a.html").write_text('<script src="https://cdn.example/x.js"></script><img src="_images/p.png">'
                                     '<link rel="stylesheet" href="//fonts.example/f.css">')
    (tmp_path / "b.css").write_text("@font-face { src: url(https://fonts.example/f.woff2); }")
    found = build_book.external_references(tmp_path)
    assert found == ["a.html: https://cdn.example/x.js", "a.html: //fonts.example/f.css", "b.css: url(//...)"]


def test_clean_outputs_drops_widgets_and_stderr():
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="Warning: /usr/lib/python3/site-packages/x.py"),
        nbformat.v4.new_output("display_data", data={build_book.WIDGET: {}, "text/plain": "0%|"}),
        nbformat.v4.new_output("stream", name="stdout", text="kept"),
    ])])
    assert build_book.clean_outputs(nb) == 2
    assert [o["text"] for o in nb.cells[0].outputs] == ["kept"]


@pytest.mark.slow
def test_chapter_5_reads_offline_in_a_real_browser(tmp_path):
    """Executed chapter 5, opened from disk with the network off: equations typeset by MathJax, plots loaded."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Chromium (.ci/run: apt-get install chromium)")
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright ([book] extra)")
    executed = tmp_path / "executed"
    assert build_book.execute([ROOT / "chapters" / "05_ppo.ipynb"], executed, timeout=1200) == 0
    import nbformat

    assert build_book.clean_outputs(nbformat.read(executed / "05_ppo.ipynb", as_version=4)) == 0  # written clean
    notebooks = [executed / c.name if (executed / c.name).exists() else c for c in build_book.chapters()]
    site = build_book.build_site(notebooks, tmp_path / "site").parent
    shots = ROOT / "build" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_context(offline=True).new_page()
        fetched = []
        page.on("request", lambda r: fetched.append(r.url))
        page.goto((site / "chapters" / "05_ppo.html").as_uri())
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
        page.evaluate("MathJax.startup.promise")  # resolves once every equation is typeset
        typeset = page.evaluate("document.querySelectorAll('mjx-container').length")
        text = page.evaluate("document.querySelector('article').innerText")
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        page.screenshot(path=str(shots / "05_ppo.png"))
        browser.close()
    assert typeset > 50, typeset
    assert "$$" not in text and "\\frac" not in text  # no raw TeX left on the page
    plots = [src for src, _ in images if "_images/" in src]
    assert len(plots) >= 4 and all(ok for _, ok in images), images
    assert [u for u in fetched if not u.startswith(("file:", "data:"))] == []
