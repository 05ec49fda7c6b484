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

from rlhf_book.exercises import reset_attempts

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "rlhf_book" / "exercises").glob("ch[0-9][0-9].py"))
GRADED = MODULES  # every chapter: each exercise has a first, gentle hint and a different, stronger one


@pytest.fixture(autouse=True)
def _fresh_attempts():
    """Each test starts with no wrong attempts recorded, so the hint shown does not depend on test order."""
    reset_attempts()
    yield
    reset_attempts()


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
    assert ok is False and ("FAIL" in out or "not answered yet" in out), out
    assert "not answered yet" in out and "hint" not in out, f"an untouched stub gets no hint: {out}"


@pytest.mark.parametrize("chapter,name", list(_cases()))
def test_no_answer_gets_no_hint(chapter, name):
    """None and ... are 'not answered yet', with no hint, and do not count as a wrong attempt."""
    check = importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES[name]
    for unanswered in (None, ...):
        ok, out = _run(check, unanswered)
        assert ok is False and out.strip().endswith("not answered yet") and "hint" not in out, out
        assert out.count("\n") == 1, out  # one line only


def _wrong(answer):
    """A wrong answer of the same kind as the reference ``answer``."""
    import torch

    if callable(answer):
        return lambda *args: torch.full((1,), 12345.0)
    if isinstance(answer, str):
        return "Z" * max(1, len(answer))
    if isinstance(answer, dict):
        return {k: "zz" for k in answer}
    if isinstance(answer, (list, tuple)):
        return [12345.0 for _ in answer]
    return float(answer) + 7.0


def _graded_cases():
    for chapter in GRADED:
        for name in importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES:
            yield pytest.param(chapter, name, id=f"{chapter}-{name}")


@pytest.mark.parametrize("chapter,name", list(_graded_cases()))
def test_two_level_hints(chapter, name):
    """No answer: no hint; first wrong answer: the first hint; second wrong answer: a different, stronger hint."""
    check = importlib.import_module(f"rlhf_book.exercises.{chapter}").EXERCISES[name]
    wrong = _wrong(getattr(_solutions(chapter), name))
    _, out0 = _run(check, None)
    assert "not answered yet" in out0 and "hint" not in out0, out0
    ok1, out1 = _run(check, wrong)
    ok2, out2 = _run(check, wrong)
    assert ok1 is False and ok2 is False, (out1, out2)
    assert "\n       hint: " in out1 and "stronger hint" not in out1, out1
    assert "\n       stronger hint: " in out2, out2
    first, second = out1.split("hint: ", 1)[1].strip(), out2.split("stronger hint: ", 1)[1].strip()
    assert first != second, (first, second)
    ok, out = _run(check, getattr(_solutions(chapter), name))
    assert ok is True and "PASS" in out and "hint" not in out, out


def test_hint_mechanics():
    from rlhf_book.exercises import attempts, check_function, check_value

    ok, out = _run(lambda a: check_value("demo", a, 2.0, hint=("gentle", "strong")), None)
    assert (ok, out) == (False, "demo: not answered yet\n") and attempts("demo") == 0  # no FAIL, no hint
    outs = [_run(lambda a: check_value("demo", a, 2.0, hint=("gentle", "strong")), 3.0)[1] for _ in range(3)]
    assert "hint: gentle" in outs[0] and "strong" not in outs[0].replace("gentle", "")
    assert all("stronger hint: strong" in o and "gentle" not in o for o in outs[1:]), outs
    assert attempts("demo") == 3 and attempts("other") == 0
    ok, out = _run(lambda a: check_value("demo", a, 2.0, hint=("gentle", "strong")), 2.0)
    assert ok is True and out.startswith("[PASS] demo")
    # a single string: the same hint every time, never labelled stronger
    outs = [_run(lambda a: check_value("single", a, "B", hint="only one"), "c")[1] for _ in range(2)]
    assert all("hint: only one" in o and "stronger" not in o for o in outs), outs
    # a part of an exercise, "name (part)", counts for the exercise
    def stub(x):
        raise NotImplementedError

    assert "not answered yet" in _run(lambda f: check_function("fn (part)", f, abs, lambda g: (1.0,)), stub)[1]
    assert attempts("fn") == 0
    _run(lambda f: check_function("fn (part)", f, abs, lambda g: (1.0,), hint=("h1", "h2")), lambda x: 5.0)
    out = _run(lambda f: check_function("fn", f, abs, lambda g: (1.0,), hint=("h1", "h2")), lambda x: 5.0)[1]
    assert "stronger hint: h2" in out, out
    reset_attempts("fn")
    assert attempts("fn") == 0 and attempts("demo") == 3


def test_checks_catch_typical_bugs():
    from rlhf_book.exercises import ch01

    ok, _ = _run(ch01.check_trajectory_logprob, lambda lp, m: (lp * m).sum(-1))  # NaN * 0 = NaN
    assert ok is False
    ok, _ = _run(ch01.check_returns_to_go, lambda r, m, g: r.flip(-1).cumsum(-1).flip(-1))  # ignores gamma
    assert ok is False
    ok, out = _run(ch01.check_trajectory_logprob, lambda lp, m: 1 / 0)
    assert ok is False and "ZeroDivisionError" in out


def _returns_ignoring_the_mask(r, m, g):
    """G_t = r_t + gamma G_{t+1} over every column, padding included: right when padding holds 0, not NaN."""
    import torch

    out, running = torch.zeros_like(r), torch.zeros_like(r[:, 0])
    for t in reversed(range(r.size(1))):
        running = r[:, t] + g * running
        out[:, t] = running
    return out * m


def test_fixed_checks_of_chapters_1_and_3():
    """Exercise 1.2 fails an implementation that ignores the mask; exercise 3.3 accepts both valid orders."""
    from rlhf_book.exercises import ch01, ch03

    ok, out = _run(ch01.check_returns_to_go, _returns_ignoring_the_mask)
    assert ok is False and "hint" in out
    for order in ("DBEAC", "DEBAC", "d, e, b, a, c"):
        assert _run(ch03.check_step_order, order)[0] is True, order
    for order in ("DEBCA", "BDEAC"):
        ok, out = _run(ch03.check_step_order, order)
        assert ok is False and "hint" in out, order
    ok, out = _run(ch03.check_step_order, None)
    assert ok is False and "not answered yet" in out and "hint" not in out


def test_ch07_checks_catch_typical_bugs():
    import torch

    from rlhf_book.critic_free import grpo_advantages
    from rlhf_book.exercises import ch07

    def centred(r, std):
        return (r - r.mean(1, keepdim=True)) / (std + 1e-4)

    def unmasked(r):  # degenerate groups of 0.9s keep a ~1e-4 advantage from rounding
        return centred(r, r.std(1, keepdim=True))

    def biased_std(r):
        return torch.where((r.amax(1) == r.amin(1))[:, None], 0.0, centred(r, r.std(1, keepdim=True, unbiased=False)))

    for bug in (unmasked, biased_std):  # (a std == 0 test fails too where torch's std rounds, not everywhere)
        ok, out = _run(ch07.check_group_advantage_fn, bug)
        assert ok is False and "hint:" in out, (bug.__name__, out)
    ok, _ = _run(ch07.check_group_advantage_fn, lambda r: grpo_advantages(r).double())
    assert ok is True
    for check, wrong in ((ch07.check_rloo_by_hand, [0.0, -1.0, -1.0, 2.0]),  # r - mean: not leave-one-out
                         (ch07.check_rloo_by_hand, "0, -4/3, -4/3, 8/3"),  # a string: a FAIL, not an exception
                         (ch07.check_grpo_by_hand, 2 / 1.5 ** 0.5),  # biased std
                         (ch07.check_pass_at_k_by_hand, 1 - 0.6 ** 2),  # with replacement
                         (ch07.check_loss_aggregation_choice, "B"),
                         (ch07.check_group_size_experiment, "C"),
                         (ch07.check_sharpen_or_widen, {"run_a": "sharpens", "run_b": "sharpens", "run_c": "neither"})):
        ok, out = _run(check, wrong)
        assert ok is False and "hint:" in out, out


def test_ch08_checks_catch_typical_bugs():
    import math

    import torch

    from rlhf_book.exercises import ch08
    from rlhf_book.overoptimization import best_of_n_distribution

    def in_given_order(p, r, n):  # the CDF accumulated in the order the atoms come, not in reward order
        F = p.cumsum(0)
        return F**n - (F - p) ** n

    def no_difference(p, r, n):  # F^n is P(best <= r(y)), not P(best = y)
        order = r.argsort()
        pi = torch.empty_like(p)
        pi[order] = p[order].cumsum(0) ** n
        return pi

    def continuous_density(p, r, n):  # n F^(n-1) p: the density of a continuous reward, not a categorical one
        order = r.argsort()
        pi = torch.empty_like(p)
        pi[order] = n * p[order].cumsum(0) ** (n - 1) * p[order]
        return pi

    def sorted_result(p, r, n):  # right values, left in reward order
        order = r.argsort()
        F = p[order].cumsum(0)
        return F**n - (F - p[order]) ** n

    for bug in (in_given_order, no_difference, continuous_density, sorted_result):
        ok, out = _run(ch08.check_best_of_n_probs_fn, bug)
        assert ok is False and "hint:" in out, (bug.__name__, out)
    ok, _ = _run(ch08.check_best_of_n_probs_fn, lambda p, r, n: best_of_n_distribution(p, r, n))  # numpy passes
    assert ok is True
    for check, wrong in ((ch08.check_kl_bound, [math.log(4), math.log(16)]),  # no - (n - 1)/n
                         (ch08.check_kl_bound, [math.log2(4) - 3 / 4, math.log2(16) - 15 / 16]),  # bits
                         (ch08.check_kl_bound, "0.64, 1.84"),  # a string: a FAIL, not an exception
                         (ch08.check_kl_coin, math.log(2) - 1 / 2),  # the bound, not the exact KL
                         (ch08.check_kl_coin, 0.5 * math.log(2) + 0.5 * math.log(2 / 3)),  # KL(p || pi_2)
                         (ch08.check_gao_peak, {"d_peak": 1.8, "kl_peak": 3.24, "gain": 0.81, "n": 70}),  # e^(KL+1)
                         (ch08.check_gao_peak, {"d_peak": 3.6, "kl_peak": 12.96, "gain": 0.0, "n": 1000}),
                         (ch08.check_gao_peak, [1.8, 3.24, 0.81, 69]),
                         (ch08.check_ensemble_choice, "D"),  # mean + std: optimism rewards the exploit
                         (ch08.check_overoptimization_diagnosis, "A"),
                         (ch08.check_selection_experiment, "D"),
                         (ch08.check_forms_matching, {"bon_fit": "d", "rl_fit": "c", "kl_bound": "a", "kl_exact": "b"})):
        ok, out = _run(check, wrong)
        assert ok is False and "hint:" in out, out


def _strict_bugs():
    """Typical wrong versions of exercise 9.2's strict_answer, each off the rule in one way."""
    import re

    def lines(reply):
        return [line.strip() for line in reply.splitlines() if line.strip()]

    def rule(pattern, count=True, strip=True, minus_zero=True, digits=40):
        def strict_answer(reply):
            ls = lines(reply) if strip else reply.split("\n")
            if not ls or (count and sum("####" in line for line in ls) != 1):
                return None
            m = pattern(ls[-1])
            if m is None or (minus_zero and m.group(1) == "-0") or len(m.group(1).lstrip("-")) > digits:
                return None
            return int(m.group(1))
        return strict_answer

    canonical = r"#### (-?(?:0|[1-9][0-9]*))"
    return {
        "search": rule(lambda line: re.search(canonical, line)),  # trailing text, extra hashes accepted
        "leading zeros": rule(lambda line: re.fullmatch(r"#### (-?[0-9]+)", line)),
        "\\d": rule(lambda line: re.fullmatch(r"#### (-?(?:0|[1-9]\d*))", line)),  # other scripts' digits
        "two markers": rule(lambda line: re.fullmatch(canonical, line), count=False),
        "no strip": rule(lambda line: re.fullmatch(canonical, line), strip=False),  # trailing blank lines, spaces
        "-0": rule(lambda line: re.fullmatch(canonical, line), minus_zero=False),
        "no MAX_DIGITS": rule(lambda line: re.fullmatch(canonical, line), digits=10**6),
    }


def test_ch09_checks_catch_typical_bugs():
    import math

    from rlhf_book.advantage import process_advantages
    from rlhf_book.exercises import ch09
    from rlhf_book.worlds import arithmetic as A

    for name, bug in _strict_bugs().items():
        ok, out = _run(ch09.check_strict_answer_fn, bug)
        assert ok is False and "hint:" in out and "For instance" in out, (name, out)
        assert ch09.hidden_check_strict_answer(bug, 777)[0] is False, name
    ok, _ = _run(ch09.check_strict_answer_fn, lambda reply: A.extract_answer(reply, "strict"))
    assert ok is True
    ok, out = _run(ch09.check_strict_answer_fn, lambda reply: A.extract_answer(reply, "lenient"))
    assert ok is False and "hint:" in out
    # 9.5's letter rests on these numbers: reply 2's tokens all pushed down, its wrong second step's the most
    adv = process_advantages(*ch09._process_group(), group_size=2)[1]
    assert [round(adv[t].item(), 3) for t in (0, 3, 6)] == [-1.935, -2.58, -1.29]
    std = math.sqrt(12 / 405)
    for check, wrong in ((ch09.check_strict_by_hand, [True, True, False, False]),  # 0132 accepted
                         (ch09.check_strict_by_hand, [True, False, False, True]),  # the last line alone
                         (ch09.check_strict_by_hand, "True, False, False, False"),  # a string: a FAIL, no exception
                         (ch09.check_lenient_by_hand, [132, None, 132, 133]),  # 0132 refused
                         (ch09.check_lenient_by_hand, [132, 132, 132, 132]),  # the first number of (d)
                         (ch09.check_lenient_by_hand, [132, 132, None, 133]),  # (c) needs the #### line
                         (ch09.check_step_rewards_by_hand, [0.25, 0.0, 0.0, 0.0]),  # the slip poisons what follows
                         (ch09.check_step_rewards_by_hand, [1 / 3, 0.0, 1 / 3, 0.0]),  # n, not n + 1
                         (ch09.check_process_advantages_by_hand, [1 / 9 / std, 1 / 9 / std]),  # own step only
                         (ch09.check_process_advantages_by_hand, [math.sqrt(4.5), -math.sqrt(4.5)]),  # biased std
                         (ch09.check_reward_diagnosis, "A"),  # the format reward
                         (ch09.check_process_credit_choice, "B"),  # each step its own reward
                         (ch09.check_degenerate_experiment, "B")):
        ok, out = _run(check, wrong)
        assert ok is False and "hint:" in out, out
    for check, right in ((ch09.check_strict_by_hand, [1, 0, 0, 0]),
                         (ch09.check_lenient_by_hand, (132.0, 132, 132, 133)),
                         (ch09.check_process_advantages_by_hand, [math.sqrt(15) / 2, -math.sqrt(15) / 2]),  # eps = 0
                         (ch09.check_reward_diagnosis, " d ")):
        assert _run(check, right)[0] is True, (check.__name__, right)


def test_ch06_checks_catch_typical_bugs():
    import math

    import torch
    import torch.nn.functional as F

    from rlhf_book.exercises import ch06

    def seq_masked_by_product(x, m):  # NaN * 0 = NaN: the padding leaks into the sum
        return (x * m).sum(-1)

    def multiplied(lp_c, ref_c, m_c, lp_r, ref_r, m_r, beta):
        margin = (seq_masked_by_product(lp_c, m_c) - seq_masked_by_product(ref_c, m_c)) - (
            seq_masked_by_product(lp_r, m_r) - seq_masked_by_product(ref_r, m_r))
        return -F.logsigmoid(beta * margin)

    def averaged(lp_c, ref_c, m_c, lp_r, ref_r, m_r, beta):  # the batch mean, not one loss per pair
        return ch06._reference_dpo(lp_c, ref_c, m_c, lp_r, ref_r, m_r, beta).mean()

    for bug in (multiplied, averaged):
        ok, out = _run(ch06.check_dpo_loss_fn, bug)
        assert ok is False and "hint:" in out, (bug.__name__, out)
    for check, wrong in ((ch06.check_dpo_loss_by_hand, math.log1p(math.exp(-2.0))),  # beta left out
                         (ch06.check_gradient_weight, 1 / (1 + math.exp(-0.6))),  # sigma(r_w - r_l): the wrong order
                         (ch06.check_gradient_weight, 1 / (1 + math.exp(6.0))),  # beta left out
                         (ch06.check_gradient_weight, 0.3),  # an implicit reward, not the weight
                         (ch06.check_loss_matching, {"sigmoid": "c", "hinge": "d", "ipo": "a", "simpo": "b"}),
                         (ch06.check_diagnosis, "C"),
                         (ch06.check_beta_choice, "D"),  # beta = 300 freezes the policy
                         (ch06.check_beta_experiment, "B")):
        ok, out = _run(check, wrong)
        assert ok is False and "hint:" in out, out
    for check, right in ((ch06.check_gradient_weight, torch.sigmoid(torch.tensor(-0.6)).item()),
                         (ch06.check_diagnosis, " d "), (ch06.check_beta_experiment, "a")):
        assert _run(check, right)[0] is True, (check.__name__, right)


def test_chapters_6_to_9_first_hints_do_not_give_the_recipe_away():
    """The first hint of the code exercises points at what to get right; the recipe is kept for the stronger one."""
    import torch

    from rlhf_book.exercises import ch06, ch07, ch08, ch09

    cases = ((ch06.check_dpo_loss_fn, ("torch.where", "logsigmoid")),
             (ch07.check_group_advantage_fn, ("amax", "keepdim", "torch.where")),
             (ch08.check_best_of_n_probs_fn, ("argsort", "cumsum")),
             (ch09.check_strict_answer_fn, ("fullmatch", "splitlines")))
    for check, recipe in cases:
        wrong = lambda *args: torch.full((1,), 12345.0)  # noqa: E731
        first = _run(check, wrong)[1]
        second = _run(check, wrong)[1]
        assert "\n       hint: " in first and not any(r in first for r in recipe), first
        assert "stronger hint: " in second and any(r in second for r in recipe), second
