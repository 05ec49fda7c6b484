import math
import random

import pytest
import torch

from rlhf_book.corpus import generate_examples
from rlhf_book.gold import Annotator, gold_reward, gold_reward_fn, gold_score, preference_probability

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
    ann = Annotator(temperature=0.5, seed=0)
    n = 4000
    wins = sum(ann.prefers_first(P, a, b) for _ in range(n))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    rec = Annotator(seed=1).label(P, a, b)
    assert set(rec) == {"prompt", "chosen", "rejected"} and {rec["chosen"], rec["rejected"]} == {a, b}


def test_gold_reward_fn_is_a_reward_function():
    r = gold_reward_fn([P, P], ["The soup was lovely.", "The soup was lovely."], torch.tensor([True, False]))
    assert r.shape == (2,) and r.dtype == torch.float32 and r[0] - r[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        gold_reward_fn([P, P], ["x"])
