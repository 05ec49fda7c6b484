"""Coursework: exercise metadata, hidden checks, `rlhf-book grade` and the student edition (issue 30).

Cheap where it can be: every chapter's solutions are checked against the visible and the hidden checks without
running a notebook; the grader itself runs small synthetic notebooks (a few seconds of kernel each); one real
chapter (the fastest, chapter 8) is graded end to end in the slow test.
"""

import contextlib
import copy
import csv
import importlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from rlhf_book import grade
from rlhf_book.exercises import DIFFICULTIES, KINDS, reset_attempts

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = grade.chapters()
SEED = 777


@pytest.fixture(autouse=True)
def _fresh_attempts():
    reset_attempts()
    yield
    reset_attempts()


def _solutions(chapter: str):
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter}", ROOT / "solutions" / f"{chapter}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        out = fn(*args)
    return out, buf.getvalue()


# the experiments' runs as the chapters' cells leave them (the hidden checks read the notebook's own run)
RUNS = {
    "ch04": {"lam": 1.0, "runs": {"critic never updated": [{"step": 0, "eval_proxy_reward": -0.3},
                                                            {"step": 20, "eval_proxy_reward": -0.3}]},
             "history_frozen": [{"step": 0, "eval_proxy_reward": -0.31}, {"step": 10, "eval_proxy_reward": 0.2},
                                {"step": 20, "eval_proxy_reward": 0.6}]},
    "ch05": {"lr": 1e-3, "runs": {"beta=0.05": [{"step": i, "clipfrac": 0.01, "approx_kl": 0.0004, "kl": 0.1}
                                                for i in range(40)]},
             "history_lr": [{"step": i, "clipfrac": 0.3, "approx_kl": 0.02, "kl": 3.0} for i in range(10)]},
    "ch06": {"beta_small": 0.1, "beta_large": 1.0,
             "dpo_drift": {0.1: {s: {"margin": 25.0 + s, "kl": 4.0} for s in range(3)},
                           1.0: {s: {"margin": 11.0, "kl": 1.1 + 0.1 * s} for s in range(3)}}},
    "ch07": {"kappa": 0.75, "degenerate": {0: {2: 0.66, 8: 0.2}, 1: {2: 0.58, 8: 0.07}, 2: {2: 0.73, 8: 0.17}}},
    "ch08": {"n_max": 64, "bon_gap": {s: {1: 0.0, 2: 0.03, 4: 0.045, 8: 0.05, 16: 0.06, 32: 0.075, 64: 0.09}
                                      for s in range(3)}},
    "ch09": {"temperature": 1.0, "degenerate": {s: {("add2", 2): 0.62 + 0.03 * s, ("add2", 8): 0.12 + 0.04 * s,
                                                    ("mul2", 2): 0.79 - 0.01 * s, ("mul2", 8): 0.38 - 0.04 * s}
                                                for s in range(3)}},
}


def _cases():
    for chapter in CHAPTERS:
        for name in grade.exercises(chapter):
            yield pytest.param(chapter, name, id=f"{chapter}-{name}")


def test_every_exercise_has_its_metadata_declared_once():
    for chapter in CHAPTERS:
        for name, check in grade.exercises(chapter).items():
            meta = check.exercise
            assert meta.name == name and meta.chapter == chapter, (chapter, name, meta)
            assert meta.points >= 1 and meta.minutes >= 1, meta
            assert meta.kind in KINDS and meta.difficulty in DIFFICULTIES, meta
            if meta.kind in ("code", "experiment"):  # the kinds a hard-coded answer could fool
                assert grade.hidden_check(chapter, name) is not None, f"{chapter}.{name} has no hidden check"
    for chapter in CHAPTERS:  # a hidden check belongs to an exercise
        for attr in dir(importlib.import_module(f"rlhf_book.exercises.{chapter}")):
            if attr.startswith("hidden_check_"):
                assert attr[len("hidden_check_"):] in grade.exercises(chapter), (chapter, attr)


def test_the_student_sees_the_metadata_on_the_first_line():
    from rlhf_book.exercises import ch01

    _, out = _quiet(ch01.check_trajectory_logprob, None)
    assert out == "trajectory_logprob (3 points · easy · ~10 min · code): not answered yet\n"
    _, out = _quiet(ch01.check_state_question, "A")
    first, second = out.splitlines()
    assert first.startswith("[FAIL] answer_state (1 point · easy · ~3 min · multiple choice): ")
    assert second.strip().startswith("hint:") and "point" not in second


def test_points_table_sums_every_chapter():
    table = grade.points_table({"ch01": "41 s"}, detail=True)
    total = sum(c.exercise.points for ch in CHAPTERS for c in grade.exercises(ch).values())
    assert f"**{total}**" in table
    for chapter in CHAPTERS:
        points = sum(c.exercise.points for c in grade.exercises(chapter).values())
        assert re.search(rf"^\| {int(chapter[2:])} \| \d+ \| [^|]+ \| {points} \|", table, re.M), (chapter, table)
    assert "| 41 s |" in table and "`trajectory_logprob`" in table


@pytest.mark.parametrize("chapter,name", list(_cases()))
def test_solution_passes_the_visible_and_the_hidden_check(chapter, name):
    check = grade.exercises(chapter)[name]
    answer = getattr(_solutions(chapter), name)
    ok, out = _quiet(check, answer)
    assert ok is True, out
    hidden = grade.hidden_check(chapter, name)
    if hidden is not None:
        ns = {name: answer, **RUNS.get(chapter, {})}
        ok, detail = _quiet(hidden, answer, SEED, ns)[0]
        assert ok is True, detail


def _only_on_the_visible_inputs(solution):
    """A function that is right on the inputs the visible check tried (it memorised them) and returns 0 elsewhere."""
    seen = []

    def same(a, b):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and torch.equal(torch.nan_to_num(a.detach(), nan=7.0),
                                                      torch.nan_to_num(b.detach(), nan=7.0))
        return a == b

    def recorder(*args):
        seen.append([a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args])
        return solution(*args)

    def hard_coded(*args):
        if any(len(s) == len(args) and all(same(a, b) for a, b in zip(s, args)) for s in seen):
            return solution(*args)
        first = args[0]
        return torch.zeros(first.shape[:1] if first.dim() > 1 else first.shape, dtype=first.dtype)

    return recorder, hard_coded


CODE = [c for c in _cases() if grade.exercises(c.values[0])[c.values[1]].exercise.kind == "code"]


@pytest.mark.parametrize("chapter,name", CODE)
def test_hidden_check_catches_an_answer_hard_coded_for_the_visible_inputs(chapter, name):
    check = grade.exercises(chapter)[name]
    recorder, hard_coded = _only_on_the_visible_inputs(getattr(_solutions(chapter), name))
    assert _quiet(check, recorder)[0] is True
    ok, out = _quiet(check, hard_coded)
    assert ok is True, f"the memorising function should fool the visible check: {out}"
    ok, detail = _quiet(grade.hidden_check(chapter, name), hard_coded, SEED, {})[0]
    assert ok is False and "hidden input" in detail, detail


def test_experiments_are_checked_against_the_notebooks_own_run():
    from rlhf_book.exercises import ch04, ch05

    ok, detail = ch04.hidden_check_answer_frozen_critic("C", SEED, {})
    assert not ok and "not in the notebook" in detail
    ok, detail = ch04.hidden_check_answer_frozen_critic("C", SEED, {**RUNS["ch04"], "lam": 0.0})
    assert not ok and "lam = 1.0" in detail
    flat = [{"step": 0, "eval_proxy_reward": 0.0}, {"step": 20, "eval_proxy_reward": 0.02}]
    ok, detail = ch04.hidden_check_answer_frozen_critic("C", SEED, {**RUNS["ch04"], "history_frozen": flat})
    assert not ok and "does not show" in detail
    same = {**RUNS["ch05"], "history_lr": RUNS["ch05"]["runs"]["beta=0.05"][:10]}
    ok, detail = ch05.hidden_check_answer_lr_experiment("B", SEED, same)
    assert not ok and "does not show" in detail


def test_experiments_of_chapters_6_to_9_are_checked_against_the_notebooks_own_run():
    from rlhf_book.exercises import ch06, ch07, ch08, ch09

    cases = (  # (hidden check, the right letter, the knob and a wrong value of it, the run's name in the notebook)
        (ch06.hidden_check_answer_beta_experiment, "A", "beta_large", 10.0, "dpo_drift"),
        (ch07.hidden_check_answer_group_size_experiment, "B", "kappa", 0.5, "degenerate"),
        (ch08.hidden_check_answer_selection_experiment, "B", "n_max", 16, "bon_gap"),
        (ch09.hidden_check_answer_degenerate_experiment, "C", "temperature", 0.5, "degenerate"),
    )
    for (check, right, knob, other, run), chapter in zip(cases, ("ch06", "ch07", "ch08", "ch09")):
        ns = RUNS[chapter]
        assert check(right, SEED, ns)[0] is True, check(right, SEED, ns)
        ok, detail = check("A" if right == "C" else "C", SEED, ns)
        assert not ok and "do not show your answer" in detail, detail
        ok, detail = check(right, SEED, {})
        assert not ok and "not in the notebook" in detail, detail
        ok, detail = check(right, SEED, {**ns, knob: other})
        assert not ok and "the question is about" in detail, detail
        fewer = dict(list(ns[run].items())[:2]) if chapter != "ch06" else {b: dict(list(v.items())[:2])
                                                                          for b, v in ns[run].items()}
        ok, detail = check(right, SEED, {**ns, run: fewer})
        assert not ok and "fewer than three" in detail, detail
    # runs that show another reading
    flat = {b: {s: {"margin": 12.0, "kl": 1.0} for s in range(3)} for b in (0.1, 1.0)}
    ok, detail = ch06.hidden_check_answer_beta_experiment("A", SEED, {**RUNS["ch06"], "dpo_drift": flat})
    assert not ok and "do not show" in detail
    assert ch06.hidden_check_answer_beta_experiment("C", SEED, {**RUNS["ch06"], "dpo_drift": flat})[0] is True
    alike = {s: {2: 0.3, 8: 0.25} for s in range(3)}
    ok, detail = ch07.hidden_check_answer_group_size_experiment("B", SEED, {**RUNS["ch07"], "degenerate": alike})
    assert not ok and "do not show" in detail
    level = {s: {1: 0.0, 2: 0.05, 64: 0.051} for s in range(3)}
    ok, detail = ch08.hidden_check_answer_selection_experiment("B", SEED, {**RUNS["ch08"], "bon_gap": level})
    assert not ok and "do not show" in detail
    assert ch08.hidden_check_answer_selection_experiment("C", SEED, {**RUNS["ch08"], "bon_gap": level})[0] is True
    flat_mul = {s: {("add2", 2): 0.65, ("add2", 8): 0.15, ("mul2", 2): 0.5, ("mul2", 8): 0.45} for s in range(3)}
    ok, detail = ch09.hidden_check_answer_degenerate_experiment("C", SEED, {**RUNS["ch09"], "degenerate": flat_mul})
    assert not ok and "do not show" in detail
    assert ch09.hidden_check_answer_degenerate_experiment("D", SEED, {**RUNS["ch09"], "degenerate": flat_mul})[0]
    no_mul = {s: {("add2", 2): 0.65, ("add2", 8): 0.15} for s in range(3)}
    ok, detail = ch09.hidden_check_answer_degenerate_experiment("C", SEED, {**RUNS["ch09"], "degenerate": no_mul})
    assert not ok and "lack the settings" in detail


def test_grader_cell_stops_a_check_that_never_returns():
    """In the kernel each exercise's checks run under a time limit (here the notebook's check cell was deleted)."""
    import time

    def loops(*args):
        while True:
            time.sleep(0.01)

    t0 = time.time()
    records = _quiet(grade.grade_namespace, "ch01", {"trajectory_logprob": loops, "answer_state": "B"}, SEED, None, (),
                     1.0)[0]
    by = {r["exercise"]: r for r in records}
    assert time.time() - t0 < 20
    assert by["trajectory_logprob"]["status"] == "timed out" and by["answer_state"]["status"] == "correct"
    assert by["returns_to_go"]["status"] == "not answered" and by["answer_state"]["points"] == 1


# --------------------------------------------------------------------------------------------------------------
# the grader on notebooks
# --------------------------------------------------------------------------------------------------------------

def _chapter_notebook(chapter: str) -> Path:
    return next((ROOT / "chapters").glob(f"{chapter[2:]}_*.ipynb"))


def _exercise_cells(chapter: str) -> list:
    """The chapter's exercise section only: each stub cell (tagged `exercise`) and the check cell after it."""
    nb = nbformat.read(_chapter_notebook(chapter), as_version=4)
    cells = []
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and "exercise" in c.metadata.get("tags", []):
            cells += [c, nb.cells[i + 1]]
    return cells


def _notebook(cells, path: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


MEMORISED = '''import torch
from rlhf_book.exercises.ch01 import _logprobs_and_mask   # the visible check's inputs, copied by a student
from rlhf_book.rollout import sequence_logprob
_seen = [_logprobs_and_mask(torch.Generator().manual_seed(1000 + t)) for t in range(5)]
_answers = [sequence_logprob(lp, m) for lp, m in _seen]

def trajectory_logprob(token_logprobs, mask):
    for (lp, m), out in zip(_seen, _answers):
        if torch.equal(torch.nan_to_num(lp), torch.nan_to_num(token_logprobs)):
            return out.clone()
    return torch.zeros(mask.shape[0])
'''

ANSWERS = {  # exercise -> what the synthetic submission puts in its stub cell
    "trajectory_logprob": MEMORISED,  # passes the visible check, fails the hidden one
    "returns_to_go": "def returns_to_go(rewards, mask, gamma):\n    while True:\n        pass\n",  # never returns
    "answer_logprob": "import math\nanswer_logprob = math.log(0.5 * 0.25 * 0.8)\n",  # right: 1 point
    "answer_state": 'answer_state = "A"\n',  # wrong
    "answer_credit": "answer_credit = undefined_variable  # raises NameError\n",  # the cell raises
    "answer_matching": 'answer_matching = {"G": "b", "V": "e", "Q": "a", "A": "d"}\n',  # right: 2 points
}


def test_grade_a_partial_submission_and_the_stubs(tmp_path):
    """One grade run over two notebooks: the stubs (0, every exercise "not answered") and a submission with a right,
    a wrong, a memorised, a raising and a looping answer (right partial score, loop stopped, hidden check bites)."""
    cells = _exercise_cells("ch01")
    (tmp_path / "subs").mkdir()
    stubs = _notebook(copy.deepcopy(cells), tmp_path / "subs" / "stubs_01.ipynb")
    partial = []
    for c in copy.deepcopy(cells):
        if "exercise" in c.metadata.get("tags", []):
            name = next(n for n in ANSWERS if re.search(rf"(def {n}\(|^{n} =)", c.source, re.M))
            c.source = ANSWERS[name]
        partial.append(c)
    partial.insert(0, nbformat.v4.new_code_cell("print('a first cell that runs fine')"))
    _notebook(partial, tmp_path / "subs" / "alice_01_notation.ipynb")
    out = tmp_path / "grading"
    records = grade.grade([tmp_path / "subs"], out=out, seed=SEED, timeout=300, cell_timeout=8, exercise_timeout=5,
                          say=lambda s: None)
    by_nb = {r["notebook"]: r for r in records}
    alice, stub = by_nb["alice_01_notation.ipynb"], by_nb[stubs.name]

    assert stub["chapter"] == "ch01" and stub["total"] == 0 and stub["max_total"] == 12
    assert {r["status"] for r in stub["results"]} == {"not answered"}, stub["results"]

    status = {r["exercise"]: r for r in alice["results"]}
    assert {n: r["status"] for n, r in status.items()} == {
        "trajectory_logprob": "wrong", "returns_to_go": "timed out", "answer_logprob": "correct",
        "answer_state": "wrong", "answer_credit": "raised", "answer_matching": "correct"}, status
    assert alice["total"] == 3 and alice["max_total"] == 12
    assert status["trajectory_logprob"]["hidden"] == "failed"  # the visible check passed
    assert "rlhf_book" in status["trajectory_logprob"]["flag"] and "flag" not in status["answer_matching"]
    assert "[PASS] trajectory_logprob" in status["trajectory_logprob"]["notebook_output"]
    assert "NameError" in status["answer_credit"]["detail"]
    assert status["answer_state"]["notebook_hint_level"] == 1 and "hint:" in status["answer_state"]["notebook_output"]
    assert alice["cells"]["timed out"] == 1 and alice["elapsed_s"] < 120

    rows = list(csv.DictReader(open(out / "grades.csv")))
    assert {r["notebook"]: r["total"] for r in rows} == {"alice_01_notation.ipynb": "3", stubs.name: "0"}
    assert rows[0]["ch01/answer_matching"] in ("0", "2") and "max_total" in rows[0]

    results = json.loads((out / "results.json").read_text())
    assert results["score"] == 3 and len(results["tests"]) == 12
    for t in results["tests"]:
        assert {"name", "score", "max_score", "output", "visibility"} <= set(t), t
    assert sum(t["max_score"] for t in results["tests"]) == 24

    text = (out / "feedback" / "alice_01_notation.md").read_text()
    assert "3 / 12 points" in text and "hidden check" in text and "the first hint" in text
    assert "answer_logprob" in text.split("## What to look at")[0]  # in the table, not among the failures
    executed = nbformat.read(out / "executed" / "alice_01_notation.ipynb", as_version=4)
    assert "grader" in executed.cells[-1].metadata.get("tags", [])


def _with_solutions(chapter: str, path: Path) -> Path:
    nb = nbformat.read(_chapter_notebook(chapter), as_version=4)
    solution = (ROOT / "solutions" / f"{chapter}.py").read_text()
    for c in nb.cells:
        if c.cell_type == "code" and "exercise" in c.metadata.get("tags", []):
            c.source = solution  # defines every answer of the chapter; each stub cell does it again
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_reference_solutions_get_full_marks_and_the_stubs_zero_on_a_real_chapter(tmp_path):
    """Chapter 8 (the fastest to run) end to end: solutions -> every point; the chapter as released -> 0."""
    subs = tmp_path / "subs"
    subs.mkdir()
    _with_solutions("ch08", subs / "solutions_08.ipynb")
    nbformat.write(nbformat.read(_chapter_notebook("ch08"), as_version=4), subs / "stubs_08.ipynb")
    records = {r["notebook"]: r for r in grade.grade([subs], out=tmp_path / "grading", seed=SEED, timeout=900,
                                                     cell_timeout=600, say=lambda s: None)}
    sol, stub = records["solutions_08.ipynb"], records["stubs_08.ipynb"]
    assert sol["total"] == sol["max_total"] == 19, sol["results"]
    assert all(r["status"] == "correct" for r in sol["results"])
    assert [r["hidden"] for r in sol["results"] if r["exercise"] == "best_of_n_probs"] == ["passed"]
    assert stub["total"] == 0 and {r["status"] for r in stub["results"]} == {"not answered"}, stub["results"]


# --------------------------------------------------------------------------------------------------------------
# the student edition, the command line, the guide
# --------------------------------------------------------------------------------------------------------------

def _distinctive_solution_lines() -> list[str]:
    lines = []
    for path in sorted((ROOT / "solutions").glob("ch*.py")):
        for ln in path.read_text().splitlines():
            s = ln.strip()
            skip = s.startswith(("import ", "from ", '"""', "def ", "return "))
            if len(s) >= 16 and not skip or re.match(r"\w+ = ", s):
                lines.append(s)
    return lines


def test_student_edition_has_stubs_and_no_solutions(tmp_path):
    from rlhf_book import cli

    out = tmp_path / "student"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["student-edition", "--out", str(out)]) == 0
    assert not (out / "solutions").exists() and not (out / "tests").exists()
    assert (out / "README.md").exists() and "How it is graded" in (out / "README.md").read_text()
    assert (out / "rlhf_book" / "exercises" / "ch01.py").exists() and (out / "data" / "results").is_dir()
    chapters = sorted((out / "chapters").glob("*.ipynb"))
    assert len(chapters) == len(list((ROOT / "chapters").glob("[0-9][0-9]_*.ipynb")))
    for path in chapters:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name
        assert "solutions/ch" not in "".join(c.source for c in nb.cells), path.name
    text = "\n".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in
                     (".py", ".ipynb", ".md", ".toml", ".txt", ".json", ".jsonl"))
    library = "\n".join(p.read_text() for p in (ROOT / "rlhf_book").rglob("*.py"))
    distinctive = [s for s in _distinctive_solution_lines() if s not in library]
    assert len(distinctive) > 40
    leaked = [s for s in distinctive if s in text]
    assert not leaked, leaked[:5]
    with pytest.raises(ValueError, match="not empty"):
        grade.student_edition(out)


def test_student_edition_refuses_a_chapter_with_an_answer(tmp_path):
    root = tmp_path / "repo"
    (root / "chapters").mkdir(parents=True)
    (root / "rlhf_book").mkdir()
    answered = nbformat.v4.new_code_cell('answer_state = "B"', metadata={"tags": ["exercise"]})
    nb = nbformat.v4.new_notebook(cells=[answered])
    nbformat.write(nb, root / "chapters" / "01_x.ipynb")
    with pytest.raises(ValueError, match="not a stub"):
        grade.student_edition(tmp_path / "out", root=root)


def test_command_line(tmp_path, capsys):
    from rlhf_book import cli

    assert cli.main(["grade", "--points"]) == 0
    assert "**all**" in capsys.readouterr().out
    assert grade.main(["--points"]) == 0
    assert "| 8 |" in capsys.readouterr().out
    assert grade.main([str(tmp_path / "missing.ipynb")]) == 2 and grade.main([]) == 2
    args = cli._parser().parse_args(["grade", "a.ipynb", "subs/", "--seed", "9", "--timeout", "60"])
    assert args.paths == ["a.ipynb", "subs/"] and args.seed == 9 and args.timeout == 60


def test_instructors_guide_is_on_the_site_with_the_generated_table():
    sys.path.insert(0, str(ROOT / "tools"))
    build_book = pytest.importorskip("build_book")
    guide = (ROOT / "site" / "instructors.md").read_text()
    index = (ROOT / "site" / "index.md").read_text()
    assert re.search(r"```\{toctree\}[^`]*\binstructors\b", index), "site/index.md's toctree lacks instructors"
    assert build_book.POINTS_TABLE in guide  # included, not typed
    times = build_book.chapter_cpu_times()
    assert set(times) == set(CHAPTERS) and all(re.match(r"\d+ s", t) for t in times.values()), times
    for needle in ("student-edition", "rlhf-book grade", "results.json", "hidden_check_", "--seed"):
        assert needle in guide, needle
