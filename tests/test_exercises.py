"""Every exercise check passes on the reference solution and fails on the notebook's stub.

Exercises follow CONTRIBUTING.md: `rlhf_book/exercises/chNN.py` has `EXERCISES`
(name -> check), the chapter notebook `chapters/NN_*.ipynb` has stub cells tagged
`exercise` that define those names, and `solutions/chNN.py` defines the answers.
"""

import contextlib
import importlib
import importlib.util
import io
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "rlhf_book" / "exercises").glob("ch[0-9][0-9].py"))


def _notebook(chapter: str) -> Path:
    found = sorted((ROOT / "chapters").glob(f"{chapter[2:]}_*.ipynb"))
    assert len(found) == 1, f"expected one notebook chapters/{chapter[2:]}_*.ipynb, found {found}"
    return found[0]


def _stubs(chapter: str) -> dict:
    ns: dict = {}
    nb = nbformat.read(_notebook(chapter), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]
    assert cells, f"{chapter}: no stub cells tagged 'exercise'"
    for c in cells:
        exec(compile(c.source, f"{chapter}-stub", "exec"), ns)
    return ns


def _solutions(chapter: str):
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter}", ROOT / "solutions" / f"{chapter}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases():
    for chapter in MODULES:
        for name in importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES:
            yield pytest.param(chapter, name, id=f"{chapter}-{name}")


def _run(check, obj) -> tuple[bool, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ok = check(obj)
    return ok, buf.getvalue()


def test_every_chapter_with_exercises_is_covered():
    assert "ch01" in MODULES
    for chapter in MODULES:
        assert (ROOT / "solutions" / f"{chapter}.py").exists(), f"solutions/{chapter}.py is missing"


@pytest.mark.parametrize("chapter,name", list(_cases()))
def test_solution_passes(chapter, name):
    check = importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES[name]
    ok, out = _run(check, getattr(_solutions(chapter), name))
    assert ok is True and "PASS" in out, out


@pytest.mark.parametrize("chapter,name", list(_cases()))
def test_notebook_stub_fails(chapter, name):
    check = importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES[name]
    stubs = _stubs(chapter)
    assert name in stubs, f"{_notebook(chapter).name} has no stub defining {name!r}"
    ok, out = _run(check, stubs[name])
    assert ok is False and "FAIL" in out, out


def test_checks_catch_typical_bugs():
    from rlhf_book.exercises import ch01

    ok, _ = _run(ch01.check_trajectory_logprob, lambda lp, m: (lp * m).sum(-1))  # NaN * 0 = NaN
    assert ok is False
    ok, _ = _run(ch01.check_returns_to_go, lambda r, m, g: r.flip(-1).cumsum(-1).flip(-1))  # ignores gamma
    assert ok is False
    ok, out = _run(ch01.check_trajectory_logprob, lambda lp, m: 1 / 0)
    assert ok is False and "ZeroDivisionError" in out
