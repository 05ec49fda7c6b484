"""Sphinx configuration of the book's website (built by tools/build_book.py into build/site/).

Everything a page needs is served from the build itself: the theme's assets, and MathJax from
the ``sphinx-mathjax-offline`` package (no CDN), so the site works with no network at all.
The chapters arrive already executed (``nb_execution_mode = "off"``).
"""

project = "rlhf-book"
author = "the rlhf-book authors"
copyright = "2026, the rlhf-book authors"

extensions = ["myst_nb", "sphinx-mathjax-offline"]
myst_enable_extensions = ["dollarmath", "amsmath"]
nb_execution_mode = "off"  # tools/build_book.py executes every chapter in a fresh kernel first
nb_merge_streams = True
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]  # README.md: only included by index.md
suppress_warnings = ["myst.header"]  # chapters start at "#" and number their own sections

html_theme = "sphinx_book_theme"
html_title = "rlhf-book"
html_static_path = ["_static"]
html_css_files = ["book.css"]  # a column wide enough for the code (the sidebars narrower), long lines wrapped
html_theme_options = {
    "use_download_button": True,  # each chapter's notebook, as executed
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "navbar_persistent": [],  # search lives in the sidebar (pydata-sphinx-theme >= 0.16 adds a second one up top)
}
html_last_updated_fmt = None
html_show_sourcelink = False


def _appendix_links(app, docname, source):
    """Chapters link to the appendix as ../site/X.md (right in Jupyter and on GitHub); on the site X.md is at ../X.md."""
    if docname.startswith("chapters/"):
        source[0] = source[0].replace("](../site/", "](../")


def setup(app):
    app.connect("source-read", _appendix_links)
