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
# In the page: the content column's width, every code cell's <pre> that scrolls (its text clipped), whether a
# 100-character line fits a code cell unwrapped, and the pipeline figure's on-screen / natural width.
LAYOUT = """() => {
  const pres = Array.from(document.querySelectorAll('div.cell pre'));
  const probe = document.createElement('span');
  probe.textContent = 'x'.repeat(100);
  probe.style.whiteSpace = 'pre';
  pres[0].appendChild(probe);
  const style = getComputedStyle(pres[0]);
  const room = pres[0].clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const line = probe.getBoundingClientRect().width;
  probe.remove();
  const cell = Array.from(document.querySelectorAll('div.cell')).find(c => c.innerText.includes('plot_pipeline('));
  const img = cell.querySelector('img');
  return {column: document.querySelector('article.bd-article').getBoundingClientRect().width,
          clipped: pres.filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.innerText.slice(0, 80)),
          line100: line, room: room, codes: pres.length,
          figure: [img.getBoundingClientRect().width, img.naturalWidth]};
}"""
COLUMN_PX = 900  # the least width of the site's content column in a 1400 px window (the browser test measures it)
READABLE_PX = 11  # the least size of a figure's text on screen
INLINE_DPI = 100  # what Jupyter's inline backend renders at (matplotlib's figure.dpi): PNG pixels per inch


def pipeline_figure():
    """The pipeline figure as a chapter shows it: its PNG's width in pixels and its smallest text in points."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from rlhf_book.plotting import plot_pipeline

    fig = plot_pipeline(chapter=5)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=INLINE_DPI, bbox_inches="tight")  # the inline backend's bbox_inches
    smallest = min(t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip())
    plt.close(fig)
    return Image.open(png).width, smallest


def test_site_builds_with_every_asset_local(tmp_path):
    import nbformat

    # chapter 1 as it is, plus a claims cell and an nbval-checked cell: neither the claims nor a marker on the site
    first = build_book.chapters()[0]
    nb = nbformat.read(first, as_version=4)
    claims = nbformat.v4.new_code_cell("print('CLAIMS-INPUT')", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="CLAIMS-OUTPUT: 4 claims of the text hold\n")])
    claims.metadata["tags"] = ["claims"]
    nb.cells += [claims, nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('CHECKED-INPUT')")]
    nbformat.write(nb, tmp_path / first.name)
    index = build_book.build_site([tmp_path / first.name, *build_book.chapters()[1:]], tmp_path / "site")
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
    for page in (site / "chapters").glob("*.html"):
        text = page.read_text()
        assert "NBVAL" not in text and "CLAIMS-" not in text, page.name
    assert "CHECKED-INPUT" in (site / "chapters" / first.with_suffix(".html").name).read_text()
    assert "book.css" in html and (site / "_static" / "book.css").exists()  # the wider column


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


def test_clean_sources_hides_nbval_markers_and_claims_cells():
    import nbformat

    checked = "# NBVAL_CHECK_OUTPUT\n# (deterministic: seeded)\nprint(1)"
    claims = nbformat.v4.new_code_cell("claims.check('section 5.5')", outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="section 5.5: 4 claims of the text hold\n")])
    claims.metadata["tags"] = ["claims"]
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# NBVAL_SKIP is a word in the prose, kept"),
        nbformat.v4.new_code_cell(checked),
        nbformat.v4.new_code_cell("  #NBVAL_IGNORE_OUTPUT\nx = 1  # NBVAL_ not at a line's start: kept"),
        nbformat.v4.new_code_cell("# NBVAL_SKIP"),
        claims,
        nbformat.v4.new_code_cell("y = 2"),
    ])
    assert build_book.clean_sources(nb) == 4
    markdown, first, second, only_marker, claims, plain = nb.cells
    assert markdown.source == "# NBVAL_SKIP is a word in the prose, kept"
    assert first.source == "# (deterministic: seeded)\nprint(1)"
    assert second.source == "x = 1  # NBVAL_ not at a line's start: kept"
    assert only_marker.source == "" and only_marker.metadata.tags == ["remove-input"]
    assert claims.metadata.tags == ["claims", "remove-cell"]  # MyST-NB drops its input and its output
    assert plain.source == "y = 2" and "tags" not in plain.metadata
    assert build_book.clean_sources(nb) == 0  # idempotent


def test_the_pipeline_figure_is_readable_at_the_columns_width():
    width, smallest = pipeline_figure()
    shown = min(width, COLUMN_PX)  # an image wider than the column is shrunk to it
    assert smallest * INLINE_DPI / 72 * shown / width >= READABLE_PX, (width, smallest)


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
        page = browser.new_context(offline=True, viewport={"width": 1400, "height": 900}).new_page()
        fetched = []
        page.on("request", lambda r: fetched.append(r.url))
        page.goto((site / "chapters" / "05_ppo.html").as_uri())
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
        page.evaluate("MathJax.startup.promise")  # resolves once every equation is typeset
        typeset = page.evaluate("document.querySelectorAll('mjx-container').length")
        text = page.evaluate("document.querySelector('article').innerText")
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        layout = page.evaluate(LAYOUT)
        page.screenshot(path=str(shots / "05_ppo.png"))
        page.locator("div.cell", has_text="plot_pipeline(").screenshot(path=str(shots / "05_ppo_pipeline.png"))
        browser.close()
    assert typeset > 50, typeset
    assert "$$" not in text and "\\frac" not in text  # no raw TeX left on the page
    plots = [src for src, _ in images if "_images/" in src]
    assert len(plots) >= 4 and all(ok for _, ok in images), images
    assert [u for u in fetched if not u.startswith(("file:", "data:"))] == []
    # readable at a 1400 px window: a wide column, no code clipped, a 100-character line unwrapped, the figure legible
    assert layout["column"] >= COLUMN_PX, layout
    assert layout["codes"] > 20 and layout["clipped"] == [], layout["clipped"]
    assert layout["line100"] <= layout["room"], layout
    shown, natural = layout["figure"]
    assert pipeline_figure()[1] * INLINE_DPI / 72 * shown / natural >= READABLE_PX, layout
    assert "NBVAL" not in text
