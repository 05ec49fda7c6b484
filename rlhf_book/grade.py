"""Coursework: grade submitted chapter notebooks, and write the student edition of the book.

    rlhf-book grade submissions/ --out grading --seed 8231     # or: python -m rlhf_book.grade submissions/ ...
    rlhf-book grade alice_01.ipynb bob_01.ipynb --timeout 900 --cell-timeout 300
    rlhf-book student-edition --out student-book                # chapters with stubs, no outputs, no solutions/

**Grading.** Each notebook runs top to bottom in a fresh Jupyter kernel, headless, on the CPU
(``CUDA_VISIBLE_DEVICES=""``), offline (the Hugging Face hub, datasets and W&B switched off, and any connection
to a non-loopback address refused inside the kernel), under a time limit for the whole notebook and one per
cell. A cell that raises does not stop the others (nbclient's ``allow_errors``); a cell that runs past its limit
is interrupted, and a kernel that does not come back is restarted and the cells that had run are replayed. At the
end the grader adds one cell of its own, which calls every exercise's check on what the notebook defined, then
its hidden check (``hidden_check_<name>`` in ``rlhf_book.exercises.chNN``) with the grading seed: code exercises
on inputs that are never printed, experiments against the notebook's own run. Each exercise ends up

* ``correct`` (its points), ``wrong`` (a FAIL, or the visible check passes and the hidden one does not),
* ``not answered`` (still the stub), ``raised`` (the learner's cell or code raised), ``timed out``.

Written into ``--out``: ``grades.csv`` (a row per notebook, a column per exercise, the total),
``results.json`` (Gradescope's format: ``score`` and ``tests`` with name, score, max_score, status, output,
visibility), ``grades.json`` (everything), ``feedback/<notebook>.md`` (which exercises failed and the hint the
student would have seen) and ``executed/<notebook>.ipynb`` (the notebook as graded).

**Student edition.** :func:`student_edition` copies the chapters with their exercise stubs and no outputs, the
library, the data the chapters read and a student README; not ``solutions/``, the tests or the tools.

:func:`points_table` is the table of points per chapter of the instructor's guide (``site/instructors.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]  # the repository (or the student edition) in a source checkout
STATUSES = ("correct", "wrong", "not answered", "raised", "timed out")
DEFAULT_SEED = 4242  # instructors: pass your own --seed and keep it private (see the instructor's guide)
_VISIBLE_SEEDS = range(1000, 1005)  # what the student-facing checks use (rlhf_book.exercises.check_function)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "WANDB_DISABLED": "true", "CUDA_VISIBLE_DEVICES": "", "OMP_WAIT_POLICY": "PASSIVE",
               "MPLBACKEND": "Agg", "TOKENIZERS_PARALLELISM": "false"}

__all__ = ["STATUSES", "chapters", "exercises", "points_table", "grade", "grade_notebook", "grade_namespace",
           "student_edition", "main", "student_edition_main"]


# --------------------------------------------------------------------------------------------------------------
# the exercise registry, per chapter
# --------------------------------------------------------------------------------------------------------------

def chapters() -> list[str]:
    """The chapters with exercises: ``["ch01", "ch02", ...]``."""
    here = Path(__file__).resolve().parent / "exercises"
    return sorted(p.stem for p in here.glob("ch[0-9][0-9].py"))


def _module(chapter: str):
    return importlib.import_module(f"rlhf_book.exercises.{chapter}")


def exercises(chapter: str) -> dict[str, Callable]:
    """``name -> check`` of a chapter, in the chapter's order; ``check.exercise`` is its metadata."""
    return dict(_module(chapter).EXERCISES)


def hidden_check(chapter: str, name: str) -> Callable | None:
    """The chapter's ``hidden_check_<name>(answer, seed, ns) -> (ok, detail)``, or None (no hidden check)."""
    return getattr(_module(chapter), f"hidden_check_{name}", None)


def points_table(cpu_times: dict[str, str] | None = None, detail: bool = False) -> str:
    """The points of every chapter as a Markdown table (generated: the instructor's guide includes it).

    One row per chapter: its exercises by kind, the points, the expected minutes and how many have hidden checks;
    ``cpu_times`` (chapter -> text, e.g. from the README's table) adds the CPU time a chapter needs. With
    ``detail`` a second table lists every exercise.
    """
    head = "| chapter | exercises | kinds | points | expected time | hidden checks |"
    rule = "|---|---|---|---|---|---|"
    if cpu_times:
        head, rule = head + " CPU time to run the chapter |", rule + "---|"
    rows, total_points, total_minutes, total_n = [head, rule], 0, 0, 0
    for ch in chapters():
        metas = [c.exercise for c in exercises(ch).values()]
        kinds: dict[str, int] = {}
        for m in metas:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        points, minutes = sum(m.points for m in metas), sum(m.minutes for m in metas)
        hidden = sum(hidden_check(ch, m.name) is not None for m in metas)
        total_points, total_minutes, total_n = total_points + points, total_minutes + minutes, total_n + len(metas)
        row = (f"| {int(ch[2:])} | {len(metas)} | " + ", ".join(f"{n} {k}" for k, n in kinds.items())
               + f" | {points} | ~{minutes} min | {hidden} |")
        if cpu_times:
            row += f" {cpu_times.get(ch, '')} |"
        rows.append(row)
    rows.append(f"| **all** | {total_n} | | **{total_points}** | ~{total_minutes / 60:.1f} h | |"
                + (" |" if cpu_times else ""))
    if detail:
        rows += ["", "| chapter | exercise | kind | points | difficulty | expected time | hidden check |",
                 "|---|---|---|---|---|---|---|"]
        for ch in chapters():
            for name, check in exercises(ch).items():
                m = check.exercise
                hidden = "yes" if hidden_check(ch, name) is not None else ""
                rows.append(f"| {int(ch[2:])} | `{name}` | {m.kind} | {m.points} | {m.difficulty} | ~{m.minutes} min | "
                            f"{hidden} |")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------------------------
# inside the kernel: the first cell the grader adds, and the last one
# --------------------------------------------------------------------------------------------------------------

class GradingTimeout(BaseException):
    """An exercise's check ran past its limit (a BaseException: the checks catch Exception, not this)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise GradingTimeout in the main thread after ``seconds`` (no limit where signals are not available)."""
    usable = seconds and seconds > 0 and hasattr(signal, "setitimer")
    try:
        old = signal.signal(signal.SIGALRM, _raise_timeout) if usable else None
    except ValueError:  # not the main thread
        usable, old = False, None
    if usable:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _raise_timeout(signum, frame):
    raise GradingTimeout()


def _kernel_setup(seed: int) -> None:
    """The grader's first cell: seed every generator, no GPU, no network beyond this machine."""
    import random
    import socket

    random.seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)
    import ipaddress

    def local(address) -> bool:
        if not isinstance(address, tuple):  # a Unix socket
            return True
        host = str(address[0])
        if host in ("localhost", ""):
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False

    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(self, address):
        if not local(address):
            raise OSError(f"no network while grading (connection to {address!r} refused)")
        return connect(self, address)

    def guarded_ex(self, address):
        if not local(address):
            raise OSError(f"no network while grading (connection to {address!r} refused)")
        return connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = guarded, guarded_ex


def grade_namespace(chapter: str, ns: dict, seed: int, log: str | Path | None = None, skip: tuple = (),
                    timeout: float = 30.0) -> list[dict]:
    """Grade what a notebook defined (``ns``, its globals): every exercise of ``chapter``, visible then hidden check.

    Runs in the student's kernel (the grader's last cell). Each check runs quietly under a time limit of
    ``timeout`` seconds; exercises in ``skip`` (their cells timed out) are not called again. Returns one record per
    exercise and appends them, as JSON lines, to ``log``.
    """
    from .exercises import _QUIET_LOG, outcome, reset_attempts

    reset_attempts()  # the hint level is that of a first wrong answer, whatever was run before
    records = []
    token = _QUIET_LOG.set(True)  # the visible checks run here do not log as the notebook's own
    try:
        for name, check in exercises(chapter).items():
            meta = check.exercise
            rec = {"phase": "grader", "chapter": chapter, "exercise": name, "max_points": meta.points,
                   "status": "not answered", "hidden": "none", "hint_level": 0, "output": "", "detail": ""}
            if name in skip:
                rec.update(status="timed out", detail="its cell ran past the time limit")
            elif name not in ns:
                rec.update(detail=f"`{name}` is not defined (did its cell run?)")
            else:
                answer = ns[name]
                buf = io.StringIO()
                try:
                    with contextlib.redirect_stdout(buf), _time_limit(timeout):
                        ok = check(answer)
                    status, level = outcome(check.last_events, ok)
                    rec.update(status=status, hint_level=level, output=buf.getvalue().strip())
                    hidden = hidden_check(chapter, name)
                    if ok and hidden is not None:
                        with contextlib.redirect_stdout(io.StringIO()), _time_limit(timeout):
                            hidden_ok, detail = hidden(answer, seed, ns)
                        rec.update(hidden="passed" if hidden_ok else "failed", detail=detail)
                        if not hidden_ok:
                            rec.update(status="wrong")
                except GradingTimeout:
                    rec.update(status="timed out", detail=f"the check ran past {timeout:g} s",
                               output=buf.getvalue().strip())
                except BaseException as e:  # noqa: BLE001 (SystemExit, KeyboardInterrupt, a hidden check's error)
                    rec.update(status="raised", detail=f"{type(e).__name__}: {e}", output=buf.getvalue().strip())
            rec["points"] = meta.points if rec["status"] == "correct" else 0
            records.append(rec)
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
    finally:
        _QUIET_LOG.reset(token)
    return records


# --------------------------------------------------------------------------------------------------------------
# the grader: run a notebook, collect the records, write the results
# --------------------------------------------------------------------------------------------------------------

def find_notebooks(paths: list[str | Path]) -> list[Path]:
    """The notebooks named, and those in the folders named (recursively), checkpoints left out."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise ValueError(f"{p}: not a notebook or a folder of notebooks")
    return found


def detect_chapter(nb, path: Path) -> str | None:
    """The chapter a notebook is: from the exercise modules it imports, else from its name (``01_...``)."""
    counts: dict[str, int] = {}
    for cell in nb.cells:
        if cell.cell_type == "code":
            for ch in re.findall(r"rlhf_book\.exercises\.(ch\d\d)\b", cell.source):
                counts[ch] = counts.get(ch, 0) + 1
    known = set(chapters())
    if counts:
        best = max(counts, key=counts.get)
        if best in known:
            return best
    m = re.match(r"(?:ch)?(\d\d)[_\-.]", path.name)
    if m and f"ch{m.group(1)}" in known:
        return f"ch{m.group(1)}"
    m = re.search(r"(?:^|[^0-9])(\d\d)_[a-z]", path.name)
    return f"ch{m.group(1)}" if m and f"ch{m.group(1)}" in known else None


def _related_cells(nb, chapter: str) -> dict[str, dict[str, list[int]]]:
    """exercise -> {"define": cells that define it, "check": cells that call its check}."""
    out = {}
    for name, check in exercises(chapter).items():
        define = re.compile(rf"(?m)^\s*(?:def\s+{re.escape(name)}\s*\(|{re.escape(name)}\s*(?::[^=\n]*)?=(?!=))")
        calls = re.compile(rf"\b{re.escape(check.__name__)}\s*\(")
        out[name] = {"define": [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and define.search(c.source)],
                     "check": [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and calls.search(c.source)]}
    return out


def _derived_seed(seed: int, what: str) -> int:
    """A seed for ``what`` from the grading seed, which student code cannot invert to the grading seed."""
    return int(hashlib.sha256(f"{seed}:{what}".encode()).hexdigest()[:8], 16)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def _kernel_env(log: Path) -> dict:
    from .cache import resolve_cache_env

    with contextlib.suppress(Exception):
        resolve_cache_env()  # an absolute $RLHF_BOOK_CACHE: the kernel runs in another directory
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["RLHF_BOOK_GRADING"] = str(log)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
    return env


def _error_output(ename: str, evalue: str):
    import nbformat

    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[])


def _run(client, cell, index: int, timeout: float) -> str:
    """Execute one cell: "ok", "error" or "timeout" (interrupted)."""
    client.timeout = max(1, int(timeout))
    replies: dict = {}
    client.on_cell_executed = lambda cell, cell_index, execute_reply: replies.update(reply=execute_reply)
    try:
        client.execute_cell(cell, index)
    except Exception as e:  # noqa: BLE001 (nbclient's own errors: a dead kernel, a timeout it could not interrupt)
        if type(e).__name__ == "DeadKernelError":
            return "dead"
        if type(e).__name__ == "CellTimeoutError":
            return "timeout"
        cell.setdefault("outputs", []).append(_error_output(type(e).__name__, str(e)))
        return "error"
    content = (replies.get("reply") or {}).get("content", {})
    if content.get("ename") == "GradingCellTimeout":
        cell.setdefault("outputs", []).append(_error_output("GradingCellTimeout",
                                                            f"interrupted after {int(timeout)} s"))
        return "timeout"
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    return "error" if errors or content.get("status") == "error" else "ok"


def _responsive(client, timeout: float = 10.0) -> bool:
    """Whether the kernel answers a trivial cell (after an interrupt it may still be stuck in the old one)."""
    import nbformat

    probe = nbformat.v4.new_code_cell("pass")
    return _run(client, probe, -1, timeout) == "ok"


def grade_notebook(path: str | Path, seed: int = DEFAULT_SEED, timeout: float = 1200, cell_timeout: float = 600,
                   exercise_timeout: float = 30, workdir: str | Path | None = None, chapter: str | None = None,
                   executed_dir: str | Path | None = None) -> dict:
    """Run one notebook in a fresh kernel and grade it; returns its record (see :func:`grade`).

    ``timeout`` bounds the notebook's own cells together, ``cell_timeout`` each of them; the grader's cell gets
    ``exercise_timeout`` per check on top. ``workdir`` is where the kernel runs (default: the book's ``chapters/``,
    as the chapters read ``../data``; else the notebook's folder).
    """
    import nbformat

    path = Path(path)
    t0 = time.time()
    nb = nbformat.read(path, as_version=4)
    chapter = chapter or detect_chapter(nb, path)
    record: dict[str, Any] = {"notebook": path.name, "path": str(path), "chapter": chapter,
                              "notes": [], "results": []}
    if chapter is None:
        record["notes"].append("not a chapter notebook: it imports no rlhf_book.exercises.chNN and its name has no "
                               "chapter number")
        record.update(total=0, max_total=0, elapsed_s=round(time.time() - t0, 1))
        return record
    metas = {n: c.exercise for n, c in exercises(chapter).items()}
    related = _related_cells(nb, chapter)
    if workdir is None:
        workdir = ROOT / "chapters" if (ROOT / "chapters").is_dir() else path.parent
    with tempfile.TemporaryDirectory(prefix="rlhf-book-grade-") as tmp:
        _execute_and_grade(nb, path, chapter, record, metas, related, Path(tmp), seed, timeout, cell_timeout,
                           exercise_timeout, workdir)
    record["total"] = sum(r["points"] for r in record["results"])
    record["max_total"] = sum(r["max_points"] for r in record["results"])
    record["elapsed_s"] = round(time.time() - t0, 1)
    if executed_dir is not None:
        Path(executed_dir).mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, Path(executed_dir) / path.name)
    return record


def _execute_and_grade(nb, path: Path, chapter: str, record: dict, metas: dict, related: dict, tmp: Path, seed: int,
                       timeout: float, cell_timeout: float, exercise_timeout: float, workdir) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook_log, grader_log = tmp / "checks.jsonl", tmp / f"grader-{uuid.uuid4().hex}.jsonl"
    for c in nb.cells:  # a submitted notebook's stale outputs must not count
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None

    setup = nbformat.v4.new_code_cell(f"import rlhf_book.grade as _rlhf_book_grade\n"
                                      f"_rlhf_book_grade._kernel_setup({_derived_seed(seed, 'notebook')})")
    student = list(nb.cells)
    nb.cells = [setup] + student
    client = NotebookClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=True,
                            interrupt_on_timeout=True, record_timing=False,
                            error_on_timeout={"ename": "GradingCellTimeout",
                                              "evalue": "the cell ran past its time limit and was interrupted",
                                              "traceback": []},
                            resources={"metadata": {"path": str(workdir)}})
    state = ["skipped"] * len(student)  # per student cell: ok / error / timeout / skipped
    deadline = time.time() + timeout
    hit_limit = False
    with client.setup_kernel(env=_kernel_env(notebook_log), cwd=str(workdir)):
        _run(client, setup, 0, 120)
        done: list[int] = []
        i = 0
        while i < len(student):
            cell = student[i]
            if cell.cell_type != "code" or not cell.source.strip():
                state[i] = "ok"
                i += 1
                continue
            left = deadline - time.time()
            if left <= 1:
                hit_limit = True
                break
            state[i] = _run(client, cell, i + 1, min(cell_timeout, left))
            if state[i] == "ok" or state[i] == "error":
                done.append(i)
            elif state[i] in ("timeout", "dead") and not (state[i] == "timeout" and _responsive(client)):
                # stuck (or dead): a new kernel, then the cells that had run, again, to get their state back
                why = "the kernel died" if state[i] == "dead" else "still running after the interrupt"
                record["notes"].append(f"cell {i + 1}: {why}; restarted the kernel and replayed the cells before it")
                if state[i] == "dead":
                    state[i] = "error"
                from jupyter_core.utils import run_sync

                run_sync(client.km.restart_kernel)(now=True)
                run_sync(client.kc.wait_for_ready)(timeout=60)
                _run(client, setup, 0, 120)
                for j in done:
                    left = deadline - time.time()
                    if left <= 1:
                        break
                    _run(client, student[j], j + 1, min(cell_timeout, left))
            i += 1
        if hit_limit:
            record["notes"].append(f"the notebook's time limit ({timeout:g} s) was reached at cell {i + 1}: the "
                                   "cells from there on did not run")
        # the grader's cell: every exercise's checks on what the notebook defined
        timed_out = {name for name, cells in related.items()
                     if any(state[j] == "timeout" for j in cells["define"] + cells["check"])}
        source = (f"import rlhf_book.grade as _rlhf_book_grade\n"
                  f"_rlhf_book_grade.grade_namespace({chapter!r}, globals(), seed={int(seed)}, "
                  f"log={str(grader_log)!r}, skip={sorted(timed_out)!r}, timeout={float(exercise_timeout)!r});")
        grading_cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["grader"]})
        nb.cells.append(grading_cell)
        grading_state = _run(client, grading_cell, len(nb.cells) - 1, exercise_timeout * 2 * len(metas) + 120)
    graded = {r["exercise"]: r for r in _read_jsonl(grader_log) if r.get("phase") == "grader"}
    seen = {}
    for r in _read_jsonl(notebook_log):
        if r.get("phase") == "notebook" and r.get("chapter") == chapter:
            seen[r["exercise"]] = r  # the last time the notebook's own check cell ran it
    for name, meta in metas.items():
        cells = related[name]
        rec = dict(graded.get(name) or {"exercise": name, "max_points": meta.points, "hidden": "not run",
                                        "hint_level": 0, "output": ""})
        rec.pop("phase", None)
        if name not in graded:
            limit = hit_limit or grading_state == "timeout"
            rec.update(status="timed out" if limit else "raised",
                       detail="the grader's cell did not finish: " + ("time limit" if limit else grading_state))
        elif rec["status"] == "not answered":
            define_states = [state[j] for j in cells["define"]]
            if "error" in define_states:
                j = cells["define"][define_states.index("error")]
                err = next((o for o in student[j].get("outputs", []) if o.get("output_type") == "error"), {})
                rec.update(status="raised", detail=f"the cell that defines it raised {err.get('ename', 'an error')}: "
                                                   f"{err.get('evalue', '')}".strip())
            elif "timeout" in define_states or (cells["define"] and "skipped" in define_states):
                rec.update(status="timed out", detail="the cell that defines it did not finish within the time limit")
        rec["chapter"], rec["title"], rec["kind"] = chapter, f"{chapter} {name}", meta.kind
        rec["points"] = meta.points if rec["status"] == "correct" else 0
        rec["max_points"] = meta.points
        imports = [j + 1 for j in cells["define"]
                   if re.search(r"\brlhf_book\b(?!\.exercises)", re.sub(r"(?m)#.*$", "", student[j].source))]
        if imports and meta.kind == "code":  # for the instructor (grades.json): the library has every reference
            rec["flag"] = f"cell {imports[0]}, which defines it, uses rlhf_book: does it call the library's reference?"
        own = seen.get(name)
        rec["notebook_output"] = own["output"] if own else ""
        rec["notebook_hint_level"] = own["hint_level"] if own else rec.get("hint_level", 0)
        record["results"].append(rec)
    record["cells"] = {"ok": state.count("ok"), "raised": state.count("error"), "timed out": state.count("timeout"),
                       "not run": state.count("skipped")}


_LEVEL = {0: "no hint", 1: "the first hint", 2: "the stronger hint"}


def feedback(record: dict) -> str:
    """The feedback file of one graded notebook (Markdown)."""
    lines = [f"# Feedback on {record['notebook']}", ""]
    if record.get("chapter") is None:
        return "\n".join(lines + record["notes"]) + "\n"
    lines += [f"Chapter {int(record['chapter'][2:])}: **{record['total']} / {record['max_total']} points**, "
              f"graded in a fresh kernel on the CPU, top to bottom ({record['elapsed_s']:.0f} s).", ""]
    lines += [f"* {n}" for n in record["notes"]]
    lines += ["", "| exercise | points | result |", "|---|---|---|"]
    for r in record["results"]:
        result = r["status"] + (" (the hidden check)" if r.get("hidden") == "failed" else "")
        lines.append(f"| `{r['exercise']}` | {r['points']} / {r['max_points']} | {result} |")
    todo = [r for r in record["results"] if r["status"] != "correct"]
    if todo:
        lines += ["", "## What to look at", ""]
    for r in todo:
        lines.append(f"### `{r['exercise']}`: {r['status']}")
        if r.get("hidden") == "failed":
            lines.append("Your answer passes the check in the notebook but not the grader's hidden check, which "
                         f"tries other inputs (or your own run): {r.get('detail', '')}. Does it compute the answer, "
                         "or return something fixed?")
        elif r["status"] == "not answered":
            lines.append(r.get("detail") or "Still the stub: answer it in its cell, then run the check below it.")
        elif r["status"] in ("raised", "timed out") and r.get("detail"):
            lines.append(r["detail"][:1].upper() + r["detail"][1:] + ".")
        shown = r.get("notebook_output") or r.get("output")
        if shown:
            level = r.get("notebook_hint_level", r.get("hint_level", 0))
            lines += [f"In the notebook the check printed ({_LEVEL.get(level, 'no hint')}):", "", "```",
                      shown, "```"]
            if level == 1:
                lines.append("Running the check again with a wrong answer shows a stronger hint.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def gradescope_results(records: list[dict]) -> dict:
    """Gradescope's ``results.json`` for one submission (one or more notebooks)."""
    tests = []
    many = len(records) > 1
    for rec in records:
        for r in rec["results"]:
            hidden = r.get("hidden") == "failed"
            out = r["status"] + (": passes the visible check, fails the hidden one" if hidden else "")
            if r.get("detail") and r["status"] != "correct":
                out += f" ({r['detail']})"
            if r.get("notebook_output") and r["status"] != "correct":
                out += "\n" + r["notebook_output"]
            tests.append({"name": (f"{rec['notebook']}: " if many else "") + f"{r['chapter']} {r['exercise']}",
                          "score": r["points"], "max_score": r["max_points"],
                          "status": "passed" if r["status"] == "correct" else "failed",
                          "output": out, "visibility": "visible"})
        if rec.get("chapter") is None:
            tests.append({"name": rec["notebook"], "score": 0, "max_score": 0, "status": "failed",
                          "output": "; ".join(rec["notes"]), "visibility": "visible"})
    total = sum(r.get("total", 0) for r in records)
    maximum = sum(r.get("max_total", 0) for r in records)
    return {"score": total, "max_score": maximum, "visibility": "visible", "stdout_visibility": "hidden",
            "execution_time": round(sum(r.get("elapsed_s", 0) for r in records)),
            "output": "; ".join(f"{r['notebook']}: {r.get('total', 0)} / {r.get('max_total', 0)}" for r in records),
            "tests": tests}


def write_results(records: list[dict], out: str | Path) -> Path:
    """grades.csv, grades.json, results.json and feedback/*.md into ``out``; returns ``out``."""
    out = Path(out)
    (out / "feedback").mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for rec in records:
        for r in rec["results"]:
            key = f"{r['chapter']}/{r['exercise']}"
            if key not in columns:
                columns.append(key)
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["notebook", "chapter", *columns, "total", "max_total"])
        for rec in records:
            scores = {f"{r['chapter']}/{r['exercise']}": r["points"] for r in rec["results"]}
            w.writerow([rec["notebook"], rec.get("chapter") or "", *[scores.get(c, "") for c in columns],
                        rec.get("total", 0), rec.get("max_total", 0)])
    (out / "grades.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(gradescope_results(records), indent=1) + "\n", encoding="utf-8")
    for rec in records:
        (out / "feedback" / (Path(rec["notebook"]).stem + ".md")).write_text(feedback(rec), encoding="utf-8")
    return out


def grade(paths: list[str | Path], out: str | Path = "grading", seed: int = DEFAULT_SEED, timeout: float = 1200,
          cell_timeout: float = 600, exercise_timeout: float = 30, workdir: str | Path | None = None,
          chapter: str | None = None, say: Callable[[str], None] = print) -> list[dict]:
    """Grade every notebook in ``paths`` (files or folders), each in a fresh kernel, and write the results to ``out``.

    Returns one record per notebook: ``notebook``, ``chapter``, ``total``, ``max_total``, ``notes`` and
    ``results`` (per exercise: ``exercise``, ``status`` (one of :data:`STATUSES`), ``points``, ``max_points``,
    ``hidden`` ("passed", "failed", "none"), ``hint_level``, ``output``, ``detail``).
    """
    notebooks = find_notebooks(paths)
    if not notebooks:
        raise ValueError(f"no notebooks in {', '.join(map(str, paths))}")
    records = []
    for path in notebooks:
        rec = grade_notebook(path, seed=seed, timeout=timeout, cell_timeout=cell_timeout,
                             exercise_timeout=exercise_timeout, workdir=workdir, chapter=chapter,
                             executed_dir=Path(out) / "executed")
        records.append(rec)
        counts = {s: sum(r["status"] == s for r in rec["results"]) for s in STATUSES}
        say(f"{path.name:<36} {rec.get('total', 0):>3} / {rec.get('max_total', 0):<3} "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f"  ({rec['elapsed_s']:.0f} s)")
    write_results(records, out)
    say(f"wrote {Path(out) / 'grades.csv'}, {Path(out) / 'results.json'} and {Path(out) / 'feedback'}/")
    return records


# --------------------------------------------------------------------------------------------------------------
# the student edition
# --------------------------------------------------------------------------------------------------------------

STUDENT_README = """# rlhf-book: student edition

A notebook textbook on RLHF. Each chapter in `chapters/` explains one part of the pipeline, runs it on a small
model on your CPU, and ends with exercises.

## Run it

In a new virtual environment (Python 3.10 or newer), from this folder:

    python -m venv .venv && . .venv/bin/activate
    pip install -e ".[book]"
    jupyter lab chapters/

Run a chapter's cells from top to bottom. The first chapter builds and caches the small base model (about two
minutes on two CPU cores); later chapters reuse it. No GPU and no network are needed once it is installed.

## Exercises, checks and hints

Each exercise gives you a cell to complete (tagged `exercise`: a function that raises `NotImplementedError`, or
an answer set to `None`) and, below it, a cell that checks your answer. The first line a check prints says what
the exercise is worth: its points, its difficulty, the time it should take and its kind (code, numeric,
multiple choice, matching, ordering, diagnosis, experiment). Then:

* until you answer, the check only says **not answered yet**;
* a wrong answer gets **FAIL** and a first hint, which never gives the answer away; running the check again
  with a wrong answer shows a stronger hint;
* a right answer gets **PASS**. Code is compared with the library's on fresh random inputs.

## How it is graded

Hand in the chapter notebooks as they are, answers filled in. Your instructor runs each one with
`rlhf-book grade`: top to bottom in a fresh kernel, on a CPU, with no network, under a time limit. So:

* the notebook must run from top to bottom on its own (restart the kernel and run all before you hand it in);
* a cell that raises or never finishes costs only its own exercise, but it may cost the exercises whose answers
  it defines;
* the grader runs every check again itself, then **hidden checks**: your functions are called on other inputs
  than the ones in the notebook, and the answer to an experiment must agree with your own notebook's run. An
  answer that only reproduces the visible check's numbers gets no points;
* each exercise gets its points when it passes both; you receive a feedback file that lists the exercises that
  did not pass and the hint the check gave.
"""

_SOLUTION_NOTE = re.compile(r"\s*Reference solutions are in\s+`solutions/ch\d\d\.py`(?::\s*try first)?\.")


def student_edition(out: str | Path, root: str | Path = ROOT, overwrite: bool = False) -> Path:
    """Write the student edition of the book into ``out``: chapters with stubs and no outputs, no ``solutions/``.

    Copies ``chapters/*.ipynb`` (every output and execution count removed, the exercise cells as the stubs they
    are), the library ``rlhf_book/`` and ``pyproject.toml`` (so ``pip install -e .`` works), ``data/`` (which the
    chapters read), the appendix pages the chapters link (``site/notation.md``, ``site/references.md``) and a
    student README. Refuses a chapter whose exercise cell is not a stub.
    """
    import nbformat

    root, out = Path(root), Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} exists and is not empty (pass overwrite=True / --force to replace it)")
        shutil.rmtree(out)
    if not (root / "chapters").is_dir():
        raise ValueError(f"{root} has no chapters/: run this from a clone of the repository")
    (out / "chapters").mkdir(parents=True, exist_ok=True)
    for path in sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
                if "exercise" in cell.metadata.get("tags", []) and not _is_stub(cell.source):
                    raise ValueError(f"{path.name}: an exercise cell is not a stub:\n{cell.source}")
            elif cell.cell_type == "markdown":
                cell.source = _SOLUTION_NOTE.sub(" Your instructor has the reference solutions.", cell.source)
            cell.metadata.pop("execution", None)
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, out / "chapters" / path.name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.runs")
    shutil.copytree(root / "rlhf_book", out / "rlhf_book", ignore=ignore)
    if (root / "data").is_dir():
        shutil.copytree(root / "data", out / "data", ignore=ignore)
    (out / "site").mkdir()
    for page in ("notation.md", "references.md"):
        if (root / "site" / page).exists():
            shutil.copy(root / "site" / page, out / "site" / page)
    for name in ("pyproject.toml", "LICENSE", "environment.yml"):
        if (root / name).exists():
            shutil.copy(root / name, out / name)
    (out / "README.md").write_text(STUDENT_README, encoding="utf-8")
    return out


def _is_stub(source: str) -> bool:
    """An exercise cell as released: its functions raise NotImplementedError, its answers are None."""
    code = [ln.split("#")[0].rstrip() for ln in source.splitlines()]
    code = [ln for ln in code if ln.strip()]
    for ln in code:
        s = ln.strip()
        if s.startswith(("import ", "from ", "def ", "raise NotImplementedError", "\"\"\"", "'''")):
            continue
        if re.fullmatch(r"\w+\s*=\s*(None|\.\.\.)", s):
            continue
        return False
    return True


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------

def add_grade_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", help="submitted notebooks, or folders of them")
    p.add_argument("--out", default="grading",
                   help="where grades.csv, results.json and feedback/ go (default: grading)")
    p.add_argument("--seed", type=int, default=int(os.environ.get("RLHF_BOOK_GRADING_SEED", DEFAULT_SEED)),
                   help="the grading seed of the hidden checks (default: $RLHF_BOOK_GRADING_SEED, else "
                        f"{DEFAULT_SEED}); choose your own and keep it private")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for a notebook's cells together (default 1200)")
    p.add_argument("--cell-timeout", type=float, default=600, help="seconds for one cell (default 600)")
    p.add_argument("--exercise-timeout", type=float, default=30,
                   help="seconds for one exercise's checks in the grader's cell (default 30)")
    p.add_argument("--chapter", default=None, help="grade every notebook as this chapter (ch01, ...) instead of "
                                                   "detecting it")
    p.add_argument("--workdir", default=None, help="where the kernels run (default: the book's chapters/)")
    p.add_argument("--points", action="store_true", help="print the points table and exit")


def add_student_edition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a new (or empty) folder")
    p.add_argument("--force", action="store_true", help="replace --out if it is not empty")


def run_grade(args: argparse.Namespace) -> int:
    if args.points:
        print(points_table(detail=True), end="")
        return 0
    if not args.paths:
        raise ValueError("name the notebooks (or folders of notebooks) to grade")
    records = grade(args.paths, out=args.out, seed=args.seed, timeout=args.timeout, cell_timeout=args.cell_timeout,
                    exercise_timeout=args.exercise_timeout, workdir=args.workdir, chapter=args.chapter)
    return 0 if all(r.get("chapter") for r in records) else 1


def run_student_edition(args: argparse.Namespace) -> int:
    out = student_edition(args.out, overwrite=args.force)
    print(f"wrote the student edition to {out} (chapters with stubs, no outputs, no solutions)")
    return 0


def _entry(prog: str, description: str, add_arguments, run, argv: list[str] | None) -> int:
    """Parse ``argv`` with ``add_arguments`` and ``run`` it; a ValueError is one ``PROG: error:`` line, exit 2."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return run(args)
    except ValueError as e:
        print(f"{prog.removeprefix('python -m ').replace('rlhf_book.', 'rlhf-book ')}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m rlhf_book.grade NOTEBOOKS... [--out DIR] [--seed N]`` (``--points``: the points table)."""
    return _entry("python -m rlhf_book.grade", "Grade chapter notebooks: a fresh kernel each, on the CPU, offline, "
                  "with time limits and hidden checks.", add_grade_arguments, run_grade, argv)


def student_edition_main(argv: list[str] | None = None) -> int:
    """``rlhf-book student-edition --out DIR``: the chapters with stubs, no outputs, no solutions."""
    return _entry("rlhf-book student-edition", "Write the student edition.", add_student_edition_arguments,
                  run_student_edition, argv)


if __name__ == "__main__":
    sys.exit(main())
