"""The book's offline world, part 1: a seeded generator of short reviews.

Every text is a *prompt* (a request for a review in one of six registers) and a
*response* (one to three sentences). The grammar has several hundred word types,
negation, contrast ("..., but ...") and closings, so a small GPT has something to
learn and RL has something to change: the base distribution is about half
positive and half negative.

Nothing here is random at import time; every sample comes from a
``random.Random(seed)`` so the same seed gives the same corpus on any machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DOMAINS",
    "Example",
    "generate_examples",
    "sample_prompts",
    "prompt_split",
    "all_prompts",
    "write_jsonl",
    "read_jsonl",
    "lexicon",
]

# --------------------------------------------------------------------------- words
POSITIVE = [
    "good", "great", "lovely", "excellent", "wonderful", "superb", "pleasant",
    "delightful", "fantastic", "charming", "brilliant", "friendly", "warm",
    "impressive", "solid", "fresh", "cozy", "clean", "generous", "perfect",
    "helpful", "smooth", "reliable", "memorable", "elegant", "tasty", "quiet",
    "bright", "gentle", "thoughtful",
]
NEGATIVE = [
    "bad", "awful", "terrible", "poor", "dull", "bland", "rude", "dirty",
    "disappointing", "mediocre", "noisy", "cold", "slow", "stale", "boring",
    "messy", "clumsy", "weak", "cramped", "greasy", "broken", "confusing",
    "overpriced", "tired", "careless", "flimsy", "sloppy", "gloomy", "harsh",
    "forgettable",
]
ADVERBS = ["very", "really", "quite", "truly", "rather", "remarkably", "surprisingly", "fairly", "incredibly", "genuinely"]
POS_VERBS = ["loved", "enjoyed", "liked", "appreciated", "adored", "admired"]
NEG_VERBS = ["hated", "disliked", "regretted", "resented", "endured"]
POS_CLOSINGS = [
    "I would come back.", "Highly recommended.", "We will return soon.",
    "Five stars from me.", "Worth every penny.", "I would gladly recommend it.",
    "A real treat.", "Thank you for a great time.",
]
NEG_CLOSINGS = [
    "I would not come back.", "Not recommended.", "Never again.",
    "One star from me.", "Save your money.", "I cannot recommend it.",
    "What a waste.", "Avoid it if you can.",
]
NEUTRAL_OPENERS = [
    "We went on a {day}.", "I visited last {day}.", "We stopped by after work.",
    "My friend suggested it.", "We came here for a {occasion}.", "I tried it last week.",
    "We had been curious for a while.", "It was our first time.",
]
DAYS = ["monday", "tuesday", "friday", "saturday", "sunday", "weekend"]
OCCASIONS = ["birthday", "holiday", "quick lunch", "family dinner", "date night", "work trip"]

DOMAINS: dict[str, dict] = {
    "restaurant": {
        "names": ["the Blue Door", "Luigi's", "the Corner Bistro", "Golden Wok", "the Olive Tree", "Maple House", "the Harbor Grill", "Casa Rosa"],
        "aspects": ["food", "soup", "pasta", "bread", "dessert", "coffee", "service", "waiter", "menu", "table", "price", "portion", "sauce", "salad"],
        "prompts": ["Review the restaurant {name}.", "How was dinner at {name}?", "Tell me about the food at {name}.", "Write a short review of {name}."],
    },
    "hotel": {
        "names": ["the Grand Palace", "Seaside Inn", "the Mountain Lodge", "City Suites", "the Old Mill", "Riverside Hotel", "the Pine Cabin", "Harbor View"],
        "aspects": ["room", "bed", "shower", "view", "staff", "breakfast", "pool", "lobby", "location", "pillow", "balcony", "parking", "wifi", "carpet"],
        "prompts": ["Review your stay at {name}.", "How was the hotel {name}?", "Tell me about your room at {name}.", "Write a short review of {name}."],
    },
    "movie": {
        "names": ["Night Train", "The Last Garden", "Silver Sky", "Paper Moon", "The Quiet Storm", "Red River", "Glass Castle", "Winter Light"],
        "aspects": ["plot", "acting", "ending", "music", "script", "cast", "pacing", "dialogue", "soundtrack", "villain", "hero", "camera", "story", "humor"],
        "prompts": ["Review the film {name}.", "What did you think of {name}?", "Tell me about the movie {name}.", "Write a short review of {name}."],
    },
    "product": {
        "names": ["the new phone", "the desk lamp", "the blender", "the headphones", "the backpack", "the coffee maker", "the keyboard", "the kettle"],
        "aspects": ["battery", "screen", "design", "button", "handle", "cable", "sound", "price", "box", "manual", "strap", "motor", "lid", "finish"],
        "prompts": ["Review {name}.", "How do you like {name}?", "Tell me about {name}.", "Write a short review of {name}."],
    },
    "book": {
        "names": ["The Long Road", "Small Hours", "the cookbook", "the mystery novel", "Open Water", "the travel guide", "Tin Soldiers", "the poetry collection"],
        "aspects": ["chapter", "writing", "cover", "author", "characters", "twist", "prose", "recipes", "maps", "narrator", "index", "photos", "poems", "translation"],
        "prompts": ["Review the book {name}.", "What did you think of {name}?", "Tell me about the book {name}.", "Write a short review of {name}."],
    },
    "trip": {
        "names": ["the coast", "the old town", "the lake", "the museum", "the night market", "the island", "the mountains", "the zoo"],
        "aspects": ["weather", "guide", "train", "walk", "crowd", "trail", "tour", "ticket", "beach", "bus", "market", "garden", "bridge", "path"],
        "prompts": ["How was your trip to {name}?", "Review your visit to {name}.", "Tell me about {name}.", "Write a short note about {name}."],
    },
}


def lexicon() -> dict[str, float]:
    """Word polarity used by the gold labeler: +1 positive, -1 negative adjectives/verbs."""
    lex = {w: 1.0 for w in POSITIVE + POS_VERBS}
    lex.update({w: -1.0 for w in NEGATIVE + NEG_VERBS})
    return lex


# ------------------------------------------------------------------------ grammar
def _adj(rng: random.Random, positive: bool) -> str:
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    r = rng.random()
    if r < 0.3:
        return f"{rng.choice(ADVERBS)} {word}"
    if r < 0.4:  # negated opposite: "not very clean" reads as negative
        return f"not {rng.choice(ADVERBS[:4])} {rng.choice(NEGATIVE if positive else POSITIVE)}"
    return word


def _sentence(rng: random.Random, aspects: list[str], positive: bool) -> str:
    a, b = rng.sample(aspects, 2)
    k = rng.randrange(7)
    if k == 0:
        return f"The {a} was {_adj(rng, positive)}."
    if k == 1:
        return f"The {a} was {_adj(rng, positive)} and the {b} was {_adj(rng, positive)}."
    if k == 2:  # contrast: the second clause carries the verdict
        return f"The {a} was {_adj(rng, not positive)}, but the {b} was {_adj(rng, positive)}."
    if k == 3:
        verb = rng.choice(POS_VERBS if positive else NEG_VERBS)
        return f"I {verb} the {a}."
    if k == 4:
        return f"Honestly, the {a} felt {_adj(rng, positive)}."
    if k == 5 and positive:
        return f"The {a} was {_adj(rng, True)} because the {b} was {_adj(rng, True)}."
    if k == 5:
        return f"The {a} and the {b} were both {_adj(rng, positive)}."
    return f"Even the {a} seemed {_adj(rng, positive)}."


@dataclass(frozen=True)
class Example:
    """One text of the world: the request, the reply and the generator's own label."""

    domain: str
    prompt: str
    response: str
    positive: bool

    def to_dict(self) -> dict:
        return {"domain": self.domain, "prompt": self.prompt, "response": self.response, "positive": self.positive}


def _prompt(rng: random.Random, domain: str) -> str:
    spec = DOMAINS[domain]
    return rng.choice(spec["prompts"]).format(name=rng.choice(spec["names"]))


def _response(rng: random.Random, domain: str, positive: bool) -> str:
    aspects = DOMAINS[domain]["aspects"]
    parts = []
    if rng.random() < 0.35:
        parts.append(rng.choice(NEUTRAL_OPENERS).format(day=rng.choice(DAYS), occasion=rng.choice(OCCASIONS)))
    for _ in range(rng.choice([1, 1, 2])):
        parts.append(_sentence(rng, aspects, positive))
    if rng.random() < 0.6:
        parts.append(rng.choice(POS_CLOSINGS if positive else NEG_CLOSINGS))
    return " ".join(parts)


def generate_examples(n: int, seed: int = 0, p_positive: float = 0.5) -> list[Example]:
    """Draw ``n`` (prompt, response) examples; deterministic for a given ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    domains = sorted(DOMAINS)
    out = []
    for _ in range(n):
        domain = rng.choice(domains)
        positive = rng.random() < p_positive
        out.append(Example(domain, _prompt(rng, domain), _response(rng, domain, positive), positive))
    return out


def sample_prompts(n: int, seed: int = 0) -> list[dict]:
    """Draw ``n`` prompts (with their domain) for RL; see :func:`prompt_split` for held-out sets."""
    rng = random.Random(seed)
    domains = sorted(DOMAINS)
    out = []
    for _ in range(n):
        d = rng.choice(domains)
        out.append({"domain": d, "prompt": _prompt(rng, d)})
    return out


def all_prompts() -> list[dict]:
    """Every distinct prompt of the world (6 domains x 8 names x 4 templates = 192)."""
    out = []
    for d in sorted(DOMAINS):
        for t in DOMAINS[d]["prompts"]:
            for name in DOMAINS[d]["names"]:
                out.append({"domain": d, "prompt": t.format(name=name)})
    return out


def prompt_split(seed: int = 0, n_eval: int = 32) -> tuple[list[dict], list[dict]]:
    """Split the 192 prompts into (train, held-out eval) lists, stratified by domain."""
    prompts = all_prompts()
    rng = random.Random(seed)
    rng.shuffle(prompts)
    per_domain = max(1, n_eval // len(DOMAINS))
    eval_set, train, seen = [], [], {d: 0 for d in DOMAINS}
    for p in prompts:
        if seen[p["domain"]] < per_domain:
            eval_set.append(p)
            seen[p["domain"]] += 1
        else:
            train.append(p)
    return train, eval_set


def write_jsonl(records, path: str | Path) -> Path:
    """Write dicts (or :class:`Example`) one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict() if isinstance(r, Example) else r) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file into a list of dicts, naming the line of any malformed record."""
    out = []
    with Path(path).open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
    return out


def write_data_dir(out: str | Path = "data") -> list[Path]:
    """Write the small files the book ships: a 1000-text corpus sample and the RL prompt split."""
    out = Path(out)
    train, held_out = prompt_split(seed=0)
    return [
        write_jsonl(generate_examples(1000, seed=0), out / "corpus_sample.jsonl"),
        write_jsonl(train, out / "prompts_train.jsonl"),
        write_jsonl(held_out, out / "prompts_eval.jsonl"),
    ]


if __name__ == "__main__":  # python -m rlhf_book.corpus [OUT_DIR]
    import sys

    for p in write_data_dir(sys.argv[1] if len(sys.argv) > 1 else "data"):
        print("wrote", p)
