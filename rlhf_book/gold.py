"""The book's offline world, part 2: the gold reward and the simulated annotators.

``gold_reward(prompt, response)`` plays the role of what people *really* want. It is
sensible (positive, fluent, on-topic, finished replies score high) and, on purpose,
hackable: a policy that learns only "positive words are good" can pile them up,
which the fluency and repetition terms punish. Chapters 2 and 5 use that gap to
show reward hacking.

The annotators label pairs by Bradley-Terry sampling::

    P(a > b) = sigmoid((r_gold(a) - r_gold(b)) / T)

so a pair of near-equal replies is a coin flip and a clear winner almost always
wins, the way noisy human raters behave.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from .corpus import DOMAINS, generate_examples, lexicon

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


def _prompt_domain(prompt: str) -> str | None:
    p = prompt.lower()
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


def gold_rewards(prompts: Sequence[str], responses: Sequence[str], terminated: Sequence[bool] | None = None) -> list[float]:
    """r_gold for a batch of (prompt, response) pairs; ``terminated`` defaults to all True."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    terminated = [True] * len(prompts) if terminated is None else list(terminated)
    return [gold_reward(p, r, t) for p, r, t in zip(prompts, responses, terminated)]


def preference_probability(r_a: float, r_b: float, temperature: float = 0.25) -> float:
    """Bradley-Terry: P(a > b) = sigmoid((r_a - r_b) / T)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = (r_a - r_b) / temperature
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class Annotator:
    """A simulated human: prefers a over b with probability sigmoid((r_gold(a) - r_gold(b)) / T).

    >>> ann = Annotator(temperature=0.25, seed=0)
    >>> ann.prefers_first("Review Luigi's.", "The food was great.", "The food was bad.")
    True
    """

    def __init__(self, temperature: float = 0.25, seed: int = 0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.rng = random.Random(seed)

    def prefers_first(self, prompt: str, a: str, b: str, a_terminated: bool = True, b_terminated: bool = True) -> bool:
        """Sample one label: True when the annotator picks ``a``."""
        p = preference_probability(gold_reward(prompt, a, a_terminated), gold_reward(prompt, b, b_terminated), self.temperature)
        return self.rng.random() < p

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

    if terminated is not None and hasattr(terminated, "tolist"):
        terminated = terminated.tolist()
    return torch.tensor(gold_rewards(prompts, responses, terminated), dtype=torch.float32)
