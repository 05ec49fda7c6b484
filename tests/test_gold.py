import math
import random

import pytest
import torch

from rlhf_book.corpus import generate_examples
from rlhf_book.gold import Annotator, gold_reward, gold_reward_fn, gold_rewards, gold_score, preference_probability

P = "Review the restaurant Casa Rosa."


def test_prefers_positive_fluent_on_topic_finished_replies():
    good = gold_reward(P, "The soup was lovely and the waiter was friendly.")
    assert good > gold_reward(P, "The soup was awful and the waiter was rude.")
    assert good > gold_reward(P, "The pool was lovely and the room was clean.")  # off-topic
    assert good > gold_reward(P, "The soup was lovely and the waiter was friendly.", terminated=False)
    assert good > gold_reward(P, "lovely lovely lovely friendly friendly friendly lovely.")  # the hack


def test_negation_flips_polarity():
    assert gold_score(P, "The soup was not very good.").sentiment < 0
    assert gold_score(P, "The soup was not very bad.").sentiment > 0


def test_no_eos_costs_exactly_the_penalty():
    r = "The soup was lovely."
    assert gold_reward(P, r) - gold_reward(P, r, terminated=False) == pytest.approx(1.0)


def test_repetition_and_disfluency_are_penalised():
    s = gold_score(P, "The soup was great great great great great great.")
    assert s.repetition > 0.3 and s.fluency < 0.6
    clean = gold_score(P, "The soup was great.")
    assert clean.repetition == 0 and clean.fluency == 1


def test_generator_text_is_fluent():
    for ex in generate_examples(200, seed=99):
        assert gold_score(ex.prompt, ex.response).fluency == 1.0


def test_bradley_terry_probability():
    assert preference_probability(1.0, 1.0) == 0.5
    assert preference_probability(1.0, 0.0, temperature=1.0) == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_probability(0.0, 1.0, 0.5) == pytest.approx(1 - preference_probability(1.0, 0.0, 0.5))
    assert preference_probability(-800.0, 800.0) == 0.0  # no overflow
    with pytest.raises(ValueError, match="temperature"):
        preference_probability(0.0, 1.0, 0.0)


def test_annotators_label_at_the_bradley_terry_rate():
    a, b = "The soup was lovely.", "The soup was fine, but the waiter was rude."
    p = preference_probability(gold_reward(P, a), gold_reward(P, b), 0.5)
    ann = Annotator(gold_reward_fn, temperature=0.5, seed=0)
    n = 4000
    wins = sum(ann.prefers_first(P, a, b) for _ in range(n))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    rec = Annotator(gold_reward_fn, seed=1).label(P, a, b)
    assert set(rec) == {"prompt", "chosen", "rejected"} and {rec["chosen"], rec["rejected"]} == {a, b}


def test_annotators_sample_from_any_reward_function():
    calls = []

    def length(prompts, responses, terminated):  # a reader's own reward: longer is better, unfinished is worse
        calls.append((list(prompts), list(responses), list(terminated)))
        return [len(r) - (100 if not t else 0) for r, t in zip(responses, terminated)]

    ann = Annotator(length, temperature=1e-6, seed=0)
    assert ann.prefers_first(P, "A long reply.", "Short.") and not ann.prefers_first(P, "Short.", "A long reply.")
    assert not ann.prefers_first(P, "A long reply.", "Short.", a_terminated=False)
    assert calls[0] == ([P, P], ["A long reply.", "Short."], [True, True])
    # the gold as a float32 tensor or as a list of doubles: the same seeded label
    a, b = "The soup was lovely.", "The soup was fine."
    same = [Annotator(fn, seed=3).prefers_first(P, a, b) for fn in (gold_reward_fn, gold_rewards)]
    assert same[0] == same[1]


def test_annotator_label_noise_flips_at_its_rate():
    a, b = "The soup was lovely.", "The soup was awful."  # a clear winner: at T -> 0 the BT draw always picks a
    n = 4000
    for flip in (0.0, 0.25, 1.0):
        ann = Annotator(gold_reward_fn, temperature=1e-6, seed=0, flip=flip)
        wins = sum(ann.prefers_first(P, a, b) for _ in range(n)) / n
        assert abs(wins - (1 - flip)) < 4 * math.sqrt(0.25 * 0.75 / n)
    # on a near coin flip: P(a > b) = (1 - flip) p + flip (1 - p)
    c = "The soup was fine."
    p = preference_probability(gold_reward(P, a), gold_reward(P, c), 2.0)
    ann = Annotator(gold_reward_fn, temperature=2.0, seed=1, flip=0.3)
    q = 0.7 * p + 0.3 * (1 - p)
    assert abs(sum(ann.prefers_first(P, a, c) for _ in range(n)) / n - q) < 4 * math.sqrt(q * (1 - q) / n)
    # flip=0 draws nothing extra: the same labels as an annotator without the option
    plain, zero = Annotator(gold_reward_fn, 2.0, seed=5), Annotator(gold_reward_fn, 2.0, seed=5, flip=0.0)
    assert [plain.prefers_first(P, a, c) for _ in range(50)] == [zero.prefers_first(P, a, c) for _ in range(50)]


@pytest.mark.parametrize("kwargs, message", [
    ({"reward_fn": 0.25}, r"Annotator: reward_fn must be a function .*got 0\.25"),
    ({"reward_fn": gold_reward_fn, "flip": 1.5}, r"Annotator: flip .* must be in \[0, 1\], got 1\.5"),
    ({"reward_fn": gold_reward_fn, "flip": float("nan")}, r"Annotator: flip .* must be in \[0, 1\], got nan"),
    ({"reward_fn": gold_reward_fn, "temperature": 0}, r"Annotator: temperature must be a number > 0, got 0"),
    ({"reward_fn": lambda p, r, t: [1.0]}, r"Annotator\.reward_fn returned 1 scores for 2 responses"),
    ({"reward_fn": lambda p, r, t: [1.0, float("nan")]}, r"Annotator\.reward_fn returned nan for row 1"),
])
def test_annotator_rejects_a_bad_reward_function(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Annotator(**kwargs).prefers_first(P, "a", "b")


def test_gold_reward_fn_is_a_reward_function():
    r = gold_reward_fn([P, P], ["The soup was lovely.", "The soup was lovely."], torch.tensor([True, False]))
    assert r.shape == (2,) and r.dtype == torch.float32 and r[0] - r[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward_fn([P, P], ["x"])
