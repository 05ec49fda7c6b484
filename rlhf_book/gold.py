"""The book's offline world, part 2: the gold reward and the simulated annotators.

``gold_reward(prompt, response)`` plays the role of what people *really* want. It is
sensible (positive, fluent, on-topic, finished replies score high) and, on purpose,
hackable: a policy that learns only "positive words are good" can pile them up,
which the fluency and repetition terms punish. Chapters 2 and 5 use that gap to
show reward hacking.

An :class:`Annotator` labels pairs by Bradley-Terry sampling on a reward function r
(any function with the library's reward-function signature; the book's annotators use
the gold reward)::

    P(a > b) = sigmoid((r(a) - r(b)) / tau)

so a pair of near-equal replies is a coin flip and a clear winner almost always
wins, the way noisy human raters behave.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .corpus import DOMAINS, generate_examples, lexicon
from .rewards import check_scores
from .tokenizer import prompt_as_text

__all__ = [
    "words",
    "GoldScore",
    "gold_score",
    "gold_reward",
    "gold_rewards",
    "preference_probability",
    "Annotator",
    "gold_reward_fn",
]

_WORD = re.compile(r"[a-z']+|[.,!?]")
_NEGATORS = {"not", "never", "no"}
# weights of the gold reward's terms (documented in GoldScore)
W_FLUENCY, W_REPETITION, W_TOPIC, NO_EOS_PENALTY = 1.0, 2.0, 0.5, 1.0
MIN_WORDS, MAX_WORDS = 4, 45


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of ``text`` (the gold labeler's view of text)."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def _known_bigrams() -> frozenset:
    """Word bigrams that the world's grammar produces (from 20k generated responses)."""
    seen = set()
    for ex in generate_examples(20_000, seed=10_007):
        w = words(ex.response)
        seen.update(zip(w, w[1:]))
    return frozenset(seen)


@lru_cache(maxsize=1)
def _aspect_domain() -> dict[str, set]:
    out: dict[str, set] = {}
    for d, spec in DOMAINS.items():
        for a in spec["aspects"]:
            out.setdefault(a, set()).add(d)
    return out


def _prompt_domain(prompt) -> str | None:
    """The domain a prompt (a string, or messages: the last user turn) asks about, or None."""
    p = prompt_as_text(prompt).lower()
    for d, spec in DOMAINS.items():
        if any(n.lower() in p for n in spec["names"]):
            return d
    return None


@dataclass(frozen=True)
class GoldScore:
    """The terms of the gold reward; ``total`` is what the book calls r_gold.

    total = sentiment + W_FLUENCY (fluency - 1) - W_REPETITION repetition
            + W_TOPIC (on_topic - 1) + length_penalty - NO_EOS_PENALTY [no EOS]
    """

    sentiment: float  # tanh(0.5 * sum of word polarities, negation flips), in (-1, 1)
    fluency: float  # fraction of word bigrams the grammar can produce, in [0, 1]
    repetition: float  # 1 - distinct bigrams / bigrams, in [0, 1)
    on_topic: float  # fraction of aspect nouns that belong to the prompt's domain
    length_penalty: float  # <= 0 when the reply is too short or too long
    terminated: bool  # did the reply end with EOS?
    total: float


def gold_score(prompt: str, response: str, terminated: bool = True) -> GoldScore:
    """Score one reply; the components explain *why* it got its reward."""
    w = words(response)
    lex = lexicon()
    polarity, flip = 0.0, 0
    for tok in w:
        if tok in _NEGATORS:
            flip = 2  # a negator flips the next polar word within two tokens
            continue
        if tok in lex:
            polarity += -lex[tok] if flip else lex[tok]
            flip = 0
        elif flip:
            flip -= 1
    sentiment = math.tanh(0.5 * polarity)
    bigrams = list(zip(w, w[1:]))
    if bigrams:
        known = _known_bigrams()
        fluency = sum(b in known for b in bigrams) / len(bigrams)
        repetition = 1.0 - len(set(bigrams)) / len(bigrams)
    else:
        fluency, repetition = 0.0, 0.0
    domain = _prompt_domain(prompt)
    aspects = [t for t in w if t in _aspect_domain()]
    if domain is None or not aspects:
        on_topic = 1.0
    else:
        on_topic = sum(domain in _aspect_domain()[a] for a in aspects) / len(aspects)
    n = sum(t.isalpha() for t in w)
    length_penalty = -0.5 if n < MIN_WORDS else -0.05 * max(0, n - MAX_WORDS)
    total = (
        sentiment
        + W_FLUENCY * (fluency - 1.0)
        - W_REPETITION * repetition
        + W_TOPIC * (on_topic - 1.0)
        + length_penalty
        - (0.0 if terminated else NO_EOS_PENALTY)
    )
    return GoldScore(sentiment, fluency, repetition, on_topic, length_penalty, terminated, total)


def gold_reward(prompt: str, response: str, terminated: bool = True) -> float:
    """r_gold(x, y): the scalar the simulated humans prefer (see :class:`GoldScore`)."""
    return gold_score(prompt, response, terminated).total


def gold_rewards(prompts: Sequence[str], responses: Sequence[str], terminated=None) -> list[float]:
    """r_gold for a batch of (prompt, response) pairs, as floats; ``terminated`` defaults to all True.

    The same reward function as :func:`gold_reward_fn`, in double precision (a list, not a float32 tensor).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if terminated is None:
        terminated = [True] * len(prompts)
    terminated = terminated.tolist() if hasattr(terminated, "tolist") else list(terminated)
    return [gold_reward(p, r, bool(t)) for p, r, t in zip(prompts, responses, terminated)]


def preference_probability(r_a: float, r_b: float, temperature: float = 0.25) -> float:
    """Bradley-Terry: P(a > b) = sigmoid((r_a - r_b) / tau), tau the annotator temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = (r_a - r_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _scores(reward_fn: Callable, prompts: Sequence[str], responses: Sequence[str], terminated, name: str) -> list:
    """``reward_fn(prompts, responses, terminated)`` as finite floats, one per reply; ValueError naming ``name``."""
    return check_scores(reward_fn(prompts, responses, terminated), len(prompts), name).tolist()


class Annotator:
    """A simulated human: prefers a over b with probability sigmoid((r(a) - r(b)) / tau), r = ``reward_fn``.

    ``reward_fn(prompts, responses, terminated) -> (B,)`` is any reward function (list of
    str, list of str, bools -> tensor or sequence of floats); the book's annotators use the
    gold reward. ``flip`` (default 0) is label noise: after the Bradley-Terry draw the label
    is inverted with probability ``flip``, so P(a > b) = (1 - flip) sigmoid(.) + flip (1 - sigmoid(.))
    (Coste et al. 2023 use 25% noise to mimic rater disagreement). With ``flip=0`` no extra
    random number is drawn: the labels are those of an annotator without the option.

    >>> ann = Annotator(gold_reward_fn, temperature=0.25, seed=0)
    >>> ann.prefers_first("Review Luigi's.", "The food was great.", "The food was bad.")
    True
    """

    def __init__(self, reward_fn: Callable, temperature: float = 0.25, seed: int = 0, flip: float = 0.0):
        if not callable(reward_fn):
            raise ValueError(
                "Annotator: reward_fn must be a function (prompts, responses, terminated) -> scores (B,), "
                f"e.g. rlhf_book.gold_reward_fn, got {reward_fn!r}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"Annotator: temperature must be a number > 0, got {temperature!r}")
        if isinstance(flip, bool) or not isinstance(flip, numbers.Real) or not 0 <= flip <= 1:
            raise ValueError(f"Annotator: flip (the probability a label is flipped) must be in [0, 1], got {flip!r}")
        self.reward_fn = reward_fn
        self.temperature = temperature
        self.flip = float(flip)
        self.rng = random.Random(seed)

    def prefers_first(self, prompt: str, a: str, b: str, a_terminated: bool = True, b_terminated: bool = True) -> bool:
        """Sample one label: True when the annotator picks ``a``."""
        terminated = [a_terminated, b_terminated]
        r_a, r_b = _scores(self.reward_fn, [prompt, prompt], [a, b], terminated, "Annotator.reward_fn")
        first = self.rng.random() < preference_probability(r_a, r_b, self.temperature)
        if self.flip > 0 and self.rng.random() < self.flip:  # label noise: the rater clicks the other one
            first = not first
        return first

    def label(self, prompt: str, a: str, b: str) -> dict:
        """Return a TRL-style record ``{"prompt", "chosen", "rejected"}`` for the pair."""
        if self.prefers_first(prompt, a, b):
            return {"prompt": prompt, "chosen": a, "rejected": b}
        return {"prompt": prompt, "chosen": b, "rejected": a}


def gold_reward_fn(prompts: Sequence[str], responses: Sequence[str], terminated=None):
    """The gold reward as a *reward function*: (prompts, responses, terminated) -> FloatTensor (B,).

    Every reward function in the book has this signature, so trainers take the gold
    score or a learned reward model interchangeably.
    """
    import torch

    return torch.tensor(gold_rewards(prompts, responses, terminated), dtype=torch.float32)
