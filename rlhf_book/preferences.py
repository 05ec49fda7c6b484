"""Preference data: pairs of replies to one prompt, labelled by the simulated annotators.

A record uses TRL's column names (plain text)::

    {"prompt": "Review Luigi's.", "chosen": "The food was great.", "rejected": "The food was bad."}

Extra fields are allowed and kept. The ones this module writes are
``chosen_terminated`` / ``rejected_terminated`` (did the reply end with EOS? a reply
without EOS gets the gold no-EOS penalty and is scored by the reward model without
an EOS token), ``chosen_gold`` / ``rejected_gold`` (r_gold of each reply, for
evaluation only: a real data set has no gold score) and ``chosen_temperature`` /
``rejected_temperature`` (the sampling temperature of each reply).

Pairs are generated from the world: the base LM writes two replies per prompt
(:func:`rlhf_book.rollout.generate`), mostly at temperature 1 and sometimes hotter,
so the data also holds disfluent replies, and an :class:`rlhf_book.gold.Annotator`
picks one by Bradley-Terry sampling on the gold score. The pairs come from the
*train* prompts of :func:`rlhf_book.corpus.prompt_split`; those prompts are split
again into train / validation / test groups, so test pairs have prompts the reward
model never saw.

``load_preference_data("cpu")`` builds the data set once (30-45 s on two cores)
and caches it with :func:`rlhf_book.cache.cached_artifact`.

Files are UTF-8 JSONL (a leading BOM is accepted). Validation also rejects strings
with lone surrogates, non-finite or non-numeric ``*_gold`` and ``*_temperature``
values, and temperatures that are not > 0.

TRL bridge: TRL's DPOTrainer / RewardTrainer read the same ``prompt`` / ``chosen`` /
``rejected`` columns but tokenize prompt and reply separately, concatenate the ids
with no separator and always append EOS to the reply. The book conditions on
``format_prompt(prompt)`` (prompt + ``"\\n"``) and adds EOS only to terminated
replies. :func:`to_trl_records` / :func:`to_trl_dataset` (a ``datasets.Dataset``)
put the separator into ``prompt`` so TRL's ids equal the book's, and by default drop
pairs with an unterminated reply (``unterminated="keep"`` keeps them, and TRL then
adds an EOS the book would not).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import cached_artifact
from .corpus import prompt_split
from .gold import Annotator, gold_reward
from .rollout import _context_size, generate
from .tokenizer import format_prompt

__all__ = [
    "FIELDS",
    "SPLITS",
    "PreferenceRecipe",
    "PREFERENCE_RECIPES",
    "PREFERENCE_VERSION",
    "validate_record",
    "validate_preferences",
    "load_preferences",
    "save_preferences",
    "generate_preferences",
    "build_preference_data",
    "load_preference_data",
    "preference_data_path",
    "preference_data_key",
    "write_sample",
    "to_trl_records",
    "to_trl_dataset",
]

FIELDS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
PREFERENCE_VERSION = 1  # bump when the recipe or the record format changes


# ------------------------------------------------------------------- validation
def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _is_number(value) -> bool:
    """A real number as JSON holds it: int or float, not bool (a bool is an int in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def validate_record(record, where: str, tokenizer=None, max_length: int | None = None) -> dict:
    """Check one record and return it; raise ValueError naming ``where`` (e.g. "line 3") and the field.

    Rules: ``prompt``, ``chosen``, ``rejected`` are strings; no string field holds a lone
    surrogate (JSON ``"\\ud800"``, not valid Unicode); ``chosen`` and ``rejected`` are
    not empty and not equal; optional ``*_terminated`` flags are booleans; optional
    ``*_gold`` scores are finite numbers and optional ``*_temperature`` values finite
    numbers > 0 (int or float, not bool, string or null). With a
    ``tokenizer``, the formatted prompt plus one reply token and EOS must fit in
    ``max_length`` tokens (default ``tokenizer.model_max_length``), and so must
    prompt + reply + EOS for both replies.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with fields {', '.join(FIELDS)}, got {type(record).__name__}"
        )
    for field in FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r} (a record needs {', '.join(FIELDS)})")
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(record[field]).__name__}")
    for field, value in record.items():
        if isinstance(value, str) and _has_lone_surrogate(value):
            raise ValueError(f"{where}: field {field!r} is not valid Unicode (lone surrogate)")
    if not record["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    for field in ("chosen", "rejected"):
        if not record[field].strip():
            raise ValueError(f"{where}: field {field!r} is empty")
    if record["chosen"] == record["rejected"]:
        raise ValueError(f"{where}: fields 'chosen' and 'rejected' are the same text, which carries no preference")
    for field in ("chosen_terminated", "rejected_terminated"):
        if field in record and not isinstance(record[field], bool):
            raise ValueError(f"{where}: field {field!r} must be true or false, got {record[field]!r}")
    for field in ("chosen_gold", "rejected_gold", "chosen_temperature", "rejected_temperature"):
        if field not in record:
            continue
        value = record[field]
        positive = field.endswith("_temperature")
        ok = _is_number(value) and not (isinstance(value, float) and not math.isfinite(value))
        if not ok or (positive and not value > 0):
            need = "a finite number > 0" if positive else "a finite number"
            raise ValueError(f"{where}: field {field!r} must be {need}, got {value!r}")
    if tokenizer is not None or max_length is not None:
        if tokenizer is None:
            raise ValueError("max_length was given without a tokenizer to count tokens with")
        limit = max_length if max_length is not None else tokenizer.model_max_length
        if limit is not None and limit < 1e9:
            n_prompt = _token_count(tokenizer, format_prompt(record["prompt"]))
            if n_prompt + 2 > limit:
                raise ValueError(
                    f"{where}: field 'prompt' is {n_prompt} tokens, too long for the context window of {limit} "
                    f"(which must also hold at least one reply token and EOS)"
                )
            for field in ("chosen", "rejected"):
                n = n_prompt + _token_count(tokenizer, record[field]) + 1
                if n > limit:
                    raise ValueError(
                        f"{where}: prompt + field {field!r} + EOS is {n} tokens, "
                        f"longer than the context window of {limit}"
                    )
    return record


def validate_preferences(records: Sequence[dict], tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Validate a list of records (see :func:`validate_record`); errors name ``record i`` (0-based)."""
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError("records is empty: a preference data set needs at least one pair")
    return [validate_record(r, f"record {i}", tokenizer, max_length) for i, r in enumerate(records)]


def load_preferences(path: str | Path, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Read and validate a preference JSONL file; ValueError names ``<path> line N`` and the field.

    The file is UTF-8, optionally with a BOM; bytes that are not UTF-8 raise ValueError
    naming the line rather than a bare UnicodeDecodeError.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such preference file")
    records = []
    # bytes.splitlines splits on \n, \r\n and \r, as text mode does; decode per line to name it
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} line {i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line: "
                f"{e.reason})"
            ) from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None
        records.append(validate_record(rec, f"{path} line {i}", tokenizer, max_length))
    if not records:
        raise ValueError(f"{path}: the file holds no records")
    return records


def save_preferences(records: Sequence[dict], path: str | Path, tokenizer=None, max_length: int | None = None) -> Path:
    """Validate every record, then write JSONL atomically; on bad input nothing is written."""
    records = validate_preferences(records, tokenizer, max_length)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------- TRL bridge
UNTERMINATED_CHOICES = ("drop", "keep")


def to_trl_records(records: Sequence[dict], unterminated: str = "drop") -> list[dict]:
    """Validated copies of ``records`` for TRL: ``prompt`` becomes ``format_prompt(prompt)``.

    TRL tokenizes ``prompt`` and each reply separately, concatenates the ids and appends
    EOS to the reply; with the separator in ``prompt`` those ids are the book's
    (:func:`rlhf_book.reward_model.encode_replies`). ``chosen``, ``rejected`` and every
    extra field are kept unchanged; the input records are not modified.

    ``unterminated`` says what to do with a pair in which either reply has
    ``*_terminated`` false (it ended without EOS): ``"drop"`` (default) leaves the pair
    out, because TRL's EOS would change what the reply means; ``"keep"`` keeps it, and
    TRL then adds an EOS the book would not. ValueError if every pair is dropped.
    """
    if not isinstance(unterminated, str) or unterminated not in UNTERMINATED_CHOICES:
        raise ValueError(
            f"unterminated must be one of {', '.join(map(repr, UNTERMINATED_CHOICES))}, got {unterminated!r}"
        )
    records = validate_preferences(records)
    out = []
    for r in records:
        if unterminated == "drop" and not (r.get("chosen_terminated", True) and r.get("rejected_terminated", True)):
            continue
        out.append({**r, "prompt": format_prompt(r["prompt"])})
    if not out:
        raise ValueError(
            f"all {len(records)} pairs have an unterminated reply and were dropped; "
            "pass unterminated='keep' to keep them"
        )
    return out


def to_trl_dataset(records: Sequence[dict], unterminated: str = "drop"):
    """:func:`to_trl_records` as a ``datasets.Dataset`` for TRL's DPOTrainer / RewardTrainer.

    The columns are every field of any record (``Dataset.from_list`` alone would keep
    only the first record's); a record without a field holds None there.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("to_trl_dataset needs the Hugging Face datasets library: pip install datasets") from e
    rows = to_trl_records(records, unterminated)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])


# ------------------------------------------------------------------- generation
@dataclass(frozen=True)
class PreferenceRecipe:
    """How many pairs to make and how.

    Each reply is sampled at a temperature drawn from ``temperatures`` with ``weights``;
    the annotators' Bradley-Terry temperature is ``annotator_temperature``. The train
    prompts of ``prompt_split`` are split into ``prompt_fractions`` for train /
    validation / test.
    """

    n_train: int
    n_validation: int
    n_test: int
    temperatures: tuple = (1.0, 1.5, 2.0)
    weights: tuple = (0.7, 0.2, 0.1)
    annotator_temperature: float = 0.25
    max_new_tokens: int = 48
    prompt_fractions: tuple = (0.76, 0.12, 0.12)
    batch_size: int = 256
    seed: int = 0


PREFERENCE_RECIPES: dict[str, PreferenceRecipe] = {
    "tiny": PreferenceRecipe(n_train=64, n_validation=16, n_test=16, max_new_tokens=16),
    "cpu": PreferenceRecipe(n_train=3000, n_validation=400, n_test=1000),
    # untested: no GPU was available when this recipe was written
    "gpu": PreferenceRecipe(n_train=20000, n_validation=1000, n_test=2000, max_new_tokens=64),
}


def _generate_many(model, tokenizer, prompts, temperatures, max_new_tokens, batch_size, generator, progress, desc):
    """Responses and terminated flags for ``prompts[i]`` at ``temperatures[i]``, batched per temperature."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: temperatures[i])
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    start = 0
    while start < len(order):
        t = temperatures[order[start]]
        chunk = [i for i in order[start : start + batch_size] if temperatures[i] == t]
        start += len(chunk)
        roll = generate(
            model,
            tokenizer,
            [prompts[i] for i in chunk],
            max_new_tokens=max_new_tokens,
            temperature=t,
            generator=generator,
        )
        for i, text, term in zip(chunk, roll.responses, roll.terminated.tolist()):
            out[i] = (text, bool(term))
        bar.update(len(chunk))
    bar.close()
    return out


def generate_preferences(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_pairs: int,
    annotator: Annotator,
    temperatures: Sequence[float] = (1.0,),
    weights: Sequence[float] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Sample two replies per prompt from ``model`` and let ``annotator`` pick one; returns records.

    Prompts are used round-robin in a shuffled order. Pairs whose replies are identical
    (no preference to learn) or empty are skipped, so slightly fewer than ``n_pairs``
    may come back.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if not prompts:
        raise ValueError("prompts is empty")
    rng = random.Random(seed)
    order = list(prompts)
    rng.shuffle(order)
    pair_prompts = [order[i % len(order)] for i in range(n_pairs)]
    flat_prompts = [p for p in pair_prompts for _ in range(2)]
    temps = rng.choices(list(temperatures), weights=weights, k=len(flat_prompts))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    replies = _generate_many(
        model, tokenizer, flat_prompts, temps, max_new_tokens, batch_size, gen, progress, "sampling pairs"
    )
    records = []
    for k, prompt in enumerate(pair_prompts):
        (a, a_term), (b, b_term) = replies[2 * k], replies[2 * k + 1]
        if a == b or not a.strip() or not b.strip():
            continue
        ga, gb = gold_reward(prompt, a, a_term), gold_reward(prompt, b, b_term)
        first = annotator.prefers_first(prompt, a, b, a_term, b_term)
        (c, ct, cg, cT), (r, rt, rg, rT) = ((a, a_term, ga, temps[2 * k]), (b, b_term, gb, temps[2 * k + 1]))
        if not first:
            (c, ct, cg, cT), (r, rt, rg, rT) = (r, rt, rg, rT), (c, ct, cg, cT)
        records.append(
            {
                "prompt": prompt,
                "chosen": c,
                "rejected": r,
                "chosen_terminated": ct,
                "rejected_terminated": rt,
                "chosen_gold": round(cg, 6),
                "rejected_gold": round(rg, 6),
                "chosen_temperature": cT,
                "rejected_temperature": rT,
            }
        )
    return records


def _split_prompts(seed: int, fractions: Sequence[float]) -> dict[str, list[str]]:
    """The train prompts of ``prompt_split(seed)`` split into train / validation / test groups."""
    train, _ = prompt_split(seed)
    prompts = sorted(p["prompt"] for p in train)
    random.Random(seed + 1).shuffle(prompts)
    n_val = max(1, round(fractions[1] * len(prompts)))
    n_test = max(1, round(fractions[2] * len(prompts)))
    return {"validation": prompts[:n_val], "test": prompts[n_val : n_val + n_test], "train": prompts[n_val + n_test :]}


def build_preference_data(
    model, tokenizer, recipe: PreferenceRecipe, out_dir: str | Path, progress: bool = True
) -> dict:
    """Generate the three splits with ``recipe`` and save ``<out_dir>/<split>.jsonl``; returns metadata."""
    out_dir = Path(out_dir)
    groups = _split_prompts(recipe.seed, recipe.prompt_fractions)
    sizes = {"train": recipe.n_train, "validation": recipe.n_validation, "test": recipe.n_test}
    meta = {"recipe": asdict(recipe), "splits": {}}
    for k, split in enumerate(SPLITS):
        annotator = Annotator(recipe.annotator_temperature, seed=recipe.seed + 7919 * (k + 1))
        recs = generate_preferences(
            model,
            tokenizer,
            groups[split],
            sizes[split],
            annotator,
            recipe.temperatures,
            recipe.weights,
            recipe.max_new_tokens,
            recipe.batch_size,
            seed=recipe.seed + 104729 * (k + 1),
            progress=progress,
        )
        save_preferences(recs, out_dir / f"{split}.jsonl", tokenizer, _context_size(model))
        agree = [r["chosen_gold"] > r["rejected_gold"] for r in recs if r["chosen_gold"] != r["rejected_gold"]]
        meta["splits"][split] = {
            "pairs": len(recs),
            "prompts": len(groups[split]),
            "label_agrees_with_gold": round(sum(agree) / max(1, len(agree)), 4),
            "gold_ties": len(recs) - len(agree),
        }
    (out_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return meta


def preference_data_key(base: str) -> str:
    """The cache key of base preset ``base``'s preference data: its recipe, version and the base LM's key."""
    from .base_model import PRESETS, artifact_name
    from .cache import artifact_key

    recipe = PREFERENCE_RECIPES[base]
    return artifact_key("prefs", base, {"recipe": asdict(recipe), "version": PREFERENCE_VERSION},
                        upstream=[artifact_name(base, PRESETS[base])])


def preference_data_path(base: str = "cpu", progress: bool = True) -> Path:
    """Directory of the cached preference data for base preset ``base`` (built on first use)."""
    from .base_model import PRESETS, load_base_model

    if base not in PREFERENCE_RECIPES or base not in PRESETS:
        raise ValueError(f"unknown base preset {base!r}; choose one of {', '.join(PREFERENCE_RECIPES)}")
    recipe = PREFERENCE_RECIPES[base]

    def build(workdir: Path) -> dict:
        model, tokenizer = load_base_model(base, progress=progress)
        return build_preference_data(model, tokenizer, recipe, workdir, progress)

    return cached_artifact(preference_data_key(base), build)


def load_preference_data(base: str = "cpu", progress: bool = True) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}`` preference records for ``base`` (cached)."""
    path = preference_data_path(base, progress)
    return {split: load_preferences(path / f"{split}.jsonl") for split in SPLITS}


def write_sample(out_dir: str | Path = "data", base: str = "cpu", n: int = 16) -> Path:
    """Write ``<out_dir>/preferences_sample.jsonl``: the first ``n`` validation pairs of ``base``'s data."""
    records = load_preference_data(base)["validation"][:n]
    return save_preferences(records, Path(out_dir) / "preferences_sample.jsonl")


if __name__ == "__main__":  # python -m rlhf_book.preferences [OUT_DIR]: rewrite the shipped sample
    import sys

    print("wrote", write_sample(sys.argv[1] if len(sys.argv) > 1 else "data"))
