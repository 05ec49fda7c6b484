"""Execute every chapter headless and write the executed notebooks and an HTML rendering.

    python tools/build_book.py            # all chapters -> build/
    python tools/build_book.py 01 03      # only chapters whose file name starts with these

Each chapter runs in a fresh kernel, on the best device rlhf_book finds (CUDA, MPS, CPU).
Shared artifacts (base model, reward model) are built on first use and cached, so the
second build is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]


def build(selected: list[str], out: Path, timeout: int) -> int:
    chapters = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb"))
    if selected:
        chapters = [c for c in chapters if any(c.name.startswith(s) for s in selected)]
    if not chapters:
        print("no chapters matched", selected, file=sys.stderr)
        return 2
    (out / "chapters").mkdir(parents=True, exist_ok=True)
    (out / "html").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rlhf_book.cache import resolve_cache_env

    resolve_cache_env()  # the kernels inherit an absolute $RLHF_BOOK_CACHE (they run in chapters/)
    exporter = HTMLExporter()
    rows, failed = [], 0
    for path in chapters:
        nb = nbformat.read(path, as_version=4)
        t0 = time.time()
        status = "ok"
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        except Exception as e:  # keep the partial notebook: it shows where it failed
            status, failed = f"FAILED: {type(e).__name__}", failed + 1
        secs = time.time() - t0
        nbformat.write(nb, out / "chapters" / path.name)
        html, _ = exporter.from_notebook_node(nb)
        (out / "html" / path.with_suffix(".html").name).write_text(html, encoding="utf-8")
        rows.append((path.stem, secs, status))
        print(f"{path.name:<32} {secs:7.1f} s  {status}", flush=True)
    links = "\n".join(f'<li><a href="{n}.html">{n}</a> ({s:.0f} s, {st})</li>' for n, s, st in rows)
    (out / "html" / "index.html").write_text(f"<html><body><h1>rlhf-book</h1><ol>{links}</ol></body></html>")
    print(f"executed notebooks in {out / 'chapters'}, HTML in {out / 'html'} (open index.html)")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("chapters", nargs="*", help="chapter number prefixes, e.g. 01 02 (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "build")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = ap.parse_args()
    return build(args.chapters, args.out, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
