"""Store the outputs of cells that opt into nbval's output check (``# NBVAL_CHECK_OUTPUT``).

Chapters are committed without outputs, except for deterministic cells marked
``# NBVAL_CHECK_OUTPUT``: their expected output is kept so that ``pytest --nbval-lax``
compares it on every run. After changing such a cell, refresh the stored output:

    python tools/store_checked_outputs.py chapters/01_notation.ipynb
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

MARK = "# NBVAL_CHECK_OUTPUT"


def refresh(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    executed = nbformat.read(path, as_version=4)
    NotebookClient(executed, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    n = 0
    for src, run in zip(nb.cells, executed.cells):
        if src.cell_type != "code":
            continue
        if MARK in src.source:
            src.outputs, src.execution_count, n = run.outputs, run.execution_count, n + 1
        else:
            src.outputs, src.execution_count = [], None
    nbformat.write(nb, path)
    return n


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, "->", refresh(Path(arg)), "checked cells stored")
