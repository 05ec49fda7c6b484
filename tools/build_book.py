"""Execute every chapter headless, then build the book's website from the executed notebooks.

    python tools/build_book.py            # all chapters -> build/chapters/*.ipynb and build/site/index.html
    python tools/build_book.py 01 03      # only chapters whose file name starts with these
    python tools/build_book.py --site-only   # rebuild the site from build/chapters (or the unexecuted chapters)

Each chapter runs in a fresh kernel, on the best device rlhf_book finds (CUDA, MPS, CPU).
Shared artifacts (base model, reward model) are built on first use and cached, so the
second build is faster. The site (Sphinx + MyST-NB + the book theme, sources in ``site/``)
is fully offline: MathJax and every asset are served from ``build/site`` itself.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "application/vnd.jupyter.widget-view+json"
# an attribute that makes the browser fetch something: scripts, styles, fonts, images, frames
_FETCH = re.compile(r"""<(script|link|img|iframe|source|video|audio)\b[^>]*?\b(src|href)\s*=\s*["']([^"']+)["']""", re.I)
_CSS_URL = re.compile(r"""url\(\s*["']?(https?:)?//""", re.I)
_NBVAL = re.compile(r"^[ \t]*#[ \t]*NBVAL_\w*.*(?:\n|$)", re.M)  # nbval's markers: "# NBVAL_CHECK_OUTPUT" etc.
CLAIMS = "claims"  # the tag of hidden cells that check the prose's numbers against computed values
POINTS_TABLE = "points_table.txt"  # generated into the site's sources; site/instructors.md includes it


def chapters(selected: list[str] | None = None) -> list[Path]:
    """The chapter notebooks in order, or those whose file name starts with one of ``selected``."""
    found = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    return [c for c in found if not selected or any(c.name.startswith(s) for s in selected)]


def execute(paths: list[Path], out: Path, timeout: int) -> int:
    """Run each notebook in a fresh kernel and write it, executed and cleaned, into ``out``; returns how many failed."""
    from nbclient import NotebookClient

    from rlhf_book.cache import resolve_cache_env

    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    resolve_cache_env()  # the kernels inherit an absolute $RLHF_BOOK_CACHE (they run in chapters/)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="rlhf-book-kernels-") as sockets:
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            t0, status = time.time(), "ok"
            try:
                NotebookClient(nb, timeout=timeout, kernel_name="python3", config=kernel_config(Path(sockets)),
                               resources={"metadata": {"path": str(path.parent)}}).execute()
            except Exception as e:  # keep the partial notebook: it shows where it failed
                status, failed = f"FAILED: {why(e)}", failed + 1
            if clean_outputs(nb):  # e.g. the progress bars of an artifact built on first use
                status += " (widget / stderr outputs dropped)"
            nbformat.write(nb, out / path.name)
            print(f"{path.name:<32} {time.time() - t0:7.1f} s  {status}", flush=True)
    return failed


def kernel_config(sockets: Path):
    """The kernels' configuration: they talk to the build over local (IPC) sockets in ``sockets``, not over TCP.

    Over TCP, ipykernel >= 7 logs "Kernel is running over TCP without encryption" once per chapter to the build's
    console. IPC sockets are files in a directory only this user can open (``tempfile``'s), so there is nothing to
    warn about, and the console shows no warning. Their path is absolute: a relative one would resolve against
    the kernel's working directory (chapters/) on one side and the build's on the other. On Windows, where ZeroMQ's
    IPC sockets need a recent libzmq, the kernels keep TCP on localhost, and the warning.
    """
    from traitlets.config import Config

    if os.name == "nt":
        return Config()
    return Config({"KernelManager": {"transport": "ipc", "ip": str(sockets.resolve() / "kernel")}})


def why(error: Exception, width: int = 160) -> str:
    """Why a chapter failed, in one line: a cell's exception (nbclient's ``ename: evalue``), else the error's first line."""
    if getattr(error, "ename", None):  # CellExecutionError: its message is the whole traceback
        return f"{error.ename}: {error.evalue}"[:width]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:width]


def clean_outputs(nb) -> int:
    """Drop what a reader of the site should not see: widget outputs (blank offline) and stderr; returns how many."""
    dropped = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        keep = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and out.get("name") == "stderr") or WIDGET in out.get("data", {}):
                dropped += 1
                continue
            keep.append(out)
        cell["outputs"] = keep
    nb.metadata.pop("widgets", None)
    return dropped


def clean_sources(nb) -> int:
    """Hide the test machinery from the site: nbval's ``# NBVAL_...`` lines, and ``claims`` cells (tagged ``remove-cell``,
    which MyST-NB leaves out, input and output); returns how many cells changed. The chapters keep both."""
    changed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        before = (cell.source, list(cell.metadata.get("tags", [])))
        cell.source = _NBVAL.sub("", cell.source)
        if CLAIMS in before[1]:
            add_tag(cell, "remove-cell")
        elif before[0].strip() and not cell.source.strip():  # nothing but markers: show the output alone
            add_tag(cell, "remove-input")
        changed += (cell.source, cell.metadata.get("tags", [])) != before
    return changed


def add_tag(cell, tag: str) -> None:
    """Give ``cell`` the tag ``tag`` (MyST-NB reads ``remove-cell``, ``remove-input`` from the cell's tags) once."""
    tags = cell.metadata.setdefault("tags", [])
    if tag not in tags:
        tags.append(tag)


def chapter_cpu_times(readme: Path = ROOT / "README.md") -> dict[str, str]:
    """chapter ("ch01") -> its CPU time as the README's chapter table measures it ("41 s"), extras in brackets dropped."""
    times = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|\s*`chapters/\d\d_\w+\.ipynb`\s*\|.*\|\s*([^|]+?)\s*\|\s*$", line)
        if m:
            times[f"ch{int(m.group(1)):02d}"] = re.sub(r"\s*\(.*$", "", m.group(2)).strip()
    return times


def write_points_table(path: Path) -> Path:
    """The instructor's guide's table (points, kinds, expected time, CPU time per chapter), from the exercise registry
    (``rlhf_book.grade.points_table``) and the README's measured times: generated, never typed."""
    from rlhf_book.grade import points_table

    path.write_text(points_table(chapter_cpu_times(), detail=True), encoding="utf-8")
    return path


def build_site(notebooks: list[Path], out: Path) -> Path:
    """Build the website from ``notebooks`` (executed or not) into ``out``; returns ``out / "index.html"``."""
    from sphinx.cmd.build import build_main

    src = out.parent / (out.name + "-src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "site", src)
    shutil.copy(ROOT / "README.md", src / "README.md")  # index.md includes parts of it: one source for both
    write_points_table(src / POINTS_TABLE)  # instructors.md includes it
    (src / "chapters").mkdir()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        if clean_outputs(nb):
            print(f"{path.name}: dropped widget and stderr outputs from the site", flush=True)
        clean_sources(nb)  # every chapter has them: nothing to report
        nbformat.write(nb, src / "chapters" / path.name)
    shutil.rmtree(out, ignore_errors=True)
    status = build_main(["-b", "html", "-q", "-W", "--keep-going", str(src), str(out)])
    if status != 0:
        raise RuntimeError(f"sphinx-build failed (exit {status}); its warnings are above")
    return out / "index.html"


def external_references(site: Path) -> list[str]:
    """``file: url`` for every script, style, font, image or frame in ``site`` that would be fetched from a network."""
    found = []
    for path in sorted(site.rglob("*")):
        if path.suffix == ".html":
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(site)}: {url}" for _, _, url in _FETCH.findall(text)
                      if re.match(r"(https?:)?//", url)]
        elif path.suffix == ".css" and _CSS_URL.search(path.read_text(encoding="utf-8", errors="replace")):
            found.append(f"{path.relative_to(site)}: url(//...)")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", help="chapter number prefixes, e.g. 01 02 (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "build")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    ap.add_argument("--site-only", action="store_true", help="do not execute; build the site from what is there")
    args = ap.parse_args()
    selected = chapters(args.chapters)
    if not selected:
        print("no chapters matched", args.chapters, file=sys.stderr)
        return 2
    executed = args.out / "chapters"
    failed = 0 if args.site_only else execute(selected, executed, args.timeout)
    # the site lists every chapter: executed ones from build/chapters, the others as they are in chapters/
    notebooks = [executed / c.name if (executed / c.name).exists() else c for c in chapters()]
    index = build_site(notebooks, args.out / "site")
    external = external_references(index.parent)
    if external:
        print("the site would fetch from the network:\n  " + "\n  ".join(external), file=sys.stderr)
        return 1
    print(f"executed notebooks in {executed}; the website: open {index} in a browser (works offline)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
