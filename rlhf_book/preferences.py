"""Preference data: pairs of replies to one prompt, labelled by (simulated) annotators.

A record uses TRL's column names (plain text)::

    {"prompt": "Review Luigi's.", "chosen": "The food was great.", "rejected": "The food was bad."}

``prompt`` may also be a conversation, a list of ``{"role", "content"}`` messages (TRL's
conversational format; it needs a tokenizer with a chat template, see
:func:`rlhf_book.tokenizer.format_prompt`).

Extra fields are allowed and kept. The ones this module writes are
``chosen_terminated`` / ``rejected_terminated`` (did the reply end with EOS? a reply
without EOS gets the gold no-EOS penalty and is scored by the reward model without
an EOS token), ``chosen_gold`` / ``rejected_gold`` (the gold score of each reply, only
when a gold reward function is given; for evaluation only: a real data set has no gold
score), ``chosen_temperature`` / ``rejected_temperature`` (the sampling temperature of
each reply) and, only for a reply that ended with a stop token other than the tokenizer's EOS
(a model whose ``generation_config`` lists several, :func:`rlhf_book.rollout.stop_token_ids`),
``chosen_eos`` / ``rejected_eos``: that token, which teacher-forced scoring then appends instead of EOS.

:func:`generate_preferences` makes pairs for any model, prompts and annotator: the model
writes two replies per prompt (:func:`rlhf_book.rollout.generate`), mostly at temperature
1 and sometimes hotter, so the data also holds disfluent replies, and the annotator (an
:class:`rlhf_book.gold.Annotator` on any reward function, or anything with its
``prefers_first``) picks one. :func:`build_preference_data` makes the three splits of a
recipe: the prompts (the book's: the *train* prompts of :func:`rlhf_book.corpus.prompt_split`;
or a reader's list) are split into train / validation / test groups, so test pairs have
prompts the reward model never saw, and annotators that sample from ``gold_fn`` label them.

``load_preference_data("cpu")`` builds the book's data set once and caches it with :func:`rlhf_book.cache.cached_artifact`; ``prompts=`` gives it a
reader's prompts instead (the book's base LM and gold annotators, cached under its own key),
and :func:`preference_data_info` returns what the build measured.

Files are UTF-8 JSONL (a leading BOM is accepted). Validation also rejects strings
with lone surrogates, non-finite or non-numeric ``*_gold`` and ``*_temperature``
values, and temperatures that are not > 0.

TRL bridge: TRL's DPOTrainer / RewardTrainer read the same ``prompt`` / ``chosen`` /
``rejected`` columns but tokenize prompt and reply separately, concatenate the ids
with no separator and always append EOS to the reply. The book conditions on
``format_prompt(prompt, tokenizer)`` (by default prompt + ``"\\n"``) and adds EOS only to
terminated replies. :func:`to_trl_records` / :func:`to_trl_dataset` (a ``datasets.Dataset``)
put the formatted prompt into ``prompt`` so TRL's ids equal the book's, and by default drop
pairs with an unterminated reply (``unterminated="keep"`` keeps them, and TRL then
adds an EOS the book would not).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import cached_artifact
from .corpus import prompt_split
from .gold import Annotator, _scores, gold_rewards
from .rollout import _context_size, generate, prompt_texts
from .tokenizer import check_prompt, encode_prompt_response, format_prompt, is_messages

__all__ = [
    "FIELDS",
    "SPLITS",
    "PreferenceRecipe",
    "PREFERENCE_RECIPES",
    "PREFERENCE_VERSION",
    "validate_record",
    "validate_preferences",
    "read_jsonl",
    "end_token_ids",
    "load_preferences",
    "save_preferences",
    "generate_preferences",
    "split_prompts",
    "build_preference_data",
    "load_preference_data",
    "preference_data_path",
    "preference_data_key",
    "preference_data_info",
    "write_sample",
    "to_trl_records",
    "to_trl_dataset",
]

FIELDS = ("prompt", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
PREFERENCE_VERSION = 1  # bump when the recipe or the record format changes


# ------------------------------------------------------------------- validation
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
    ``tokenizer``, the formatted prompt (``format_prompt(prompt, tokenizer)``) plus one reply token and EOS must fit in
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
        if not isinstance(record[field], str) and not (field == "prompt" and is_messages(record[field])):
            raise ValueError(f"{where}: field {field!r} must be a string"
                             f"{' or a list of messages' if field == 'prompt' else ''}, got {type(record[field]).__name__}")
    if is_messages(record["prompt"]):
        check_prompt(record["prompt"], f"{where}: field 'prompt'")
    for field, value in record.items():
        texts = [m.get("content") for m in value if isinstance(m, dict)] if field == "prompt" and is_messages(value) else [value]
        if any(isinstance(v, str) and _has_lone_surrogate(v) for v in texts):
            raise ValueError(f"{where}: field {field!r} is not valid Unicode (lone surrogate)")
    if isinstance(record["prompt"], str) and not record["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    for field in ("chosen_eos", "rejected_eos"):
        if field in record and (not isinstance(record[field], str) or not record[field]):
            raise ValueError(f"{where}: field {field!r} must be a token (a non-empty string), got {record[field]!r}")
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
            try:
                eos = [None, *end_token_ids(tokenizer, [record], "chosen"), *end_token_ids(tokenizer, [record], "rejected")]
                prompt_only, chosen, rejected = encode_prompt_response(
                    tokenizer, [record["prompt"]] * 3, ["", record["chosen"], record["rejected"]], [False, True, True], eos
                )
            except ValueError as e:
                raise ValueError(f"{where}: {str(e).replace('prompts[0]', 'field ' + repr('prompt'))}") from None
            n_prompt = len(prompt_only)
            if n_prompt + 2 > limit:
                raise ValueError(
                    f"{where}: field 'prompt' is {n_prompt} tokens, too long for the context window of {limit} "
                    f"(which must also hold at least one reply token and EOS)"
                )
            for field, ids in (("chosen", chosen), ("rejected", rejected)):
                n = len(ids)
                if n > limit:
                    raise ValueError(
                        f"{where}: prompt + field {field!r} + EOS is {n} tokens, "
                        f"longer than the context window of {limit}"
                    )
    return record


def validate_preferences(records: Sequence[dict], tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Validate a list of records (see :func:`validate_record`); errors name ``record i`` (0-based)."""
    return validate_all(records, validate_record, "a preference data set needs at least one pair", tokenizer,
                        max_length)


def validate_all(records, validate, empty: str, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """``validate(record, "record i", tokenizer, max_length)`` of every record of a list; ValueError if not a list
    or empty (``empty`` says what one needs)."""
    if isinstance(records, (str, bytes, Mapping)) or not hasattr(records, "__iter__"):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError(f"records is empty: {empty}")
    return [validate(r, f"record {i}", tokenizer, max_length) for i, r in enumerate(records)]


def end_token_ids(tokenizer, records: Sequence[dict], side: str) -> list[int | None]:
    """The id of each record's ``<side>_eos`` token (None where the record has none: the tokenizer's EOS is appended)."""
    out = []
    for r in records:
        tok = r.get(f"{side}_eos")
        if tok is None:
            out.append(None)
            continue
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or (i == tokenizer.unk_token_id and tok != tokenizer.unk_token):
            raise ValueError(f"field '{side}_eos': {tok!r} is not a token of this tokenizer")
        out.append(int(i))
    return out


def read_jsonl(path: str | Path, what: str = "JSONL") -> list[tuple[int, object]]:
    """(line number, parsed JSON value) of each non-blank line of a UTF-8 JSONL file (a leading BOM is accepted).

    The one JSONL reader of records (preference pairs, SFT records): a missing file, bytes
    that are not UTF-8 and lines that are not JSON raise ValueError naming ``<path> line N``.
    ``what`` names the kind of file in the missing-file error.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such {what} file")
    out = []
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
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg})") from None
    if not out:
        raise ValueError(f"{path}: the file holds no records")
    return out


def load_preferences(path: str | Path, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Read and validate a preference JSONL file; ValueError names ``<path> line N`` and the field.

    The file is UTF-8, optionally with a BOM; bytes that are not UTF-8 raise ValueError
    naming the line rather than a bare UnicodeDecodeError (:func:`read_jsonl`).
    """
    path = Path(path)
    return [validate_record(rec, f"{path} line {i}", tokenizer, max_length) for i, rec in read_jsonl(path, "preference")]


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


def to_trl_records(records: Sequence[dict], unterminated: str = "drop", tokenizer=None) -> list[dict]:
    """Validated copies of ``records`` for TRL: ``prompt`` becomes ``format_prompt(prompt, tokenizer)``.

    TRL tokenizes ``prompt`` and each reply separately, concatenates the ids and appends
    EOS to the reply; with the formatted prompt in ``prompt`` those ids are the book's
    (:func:`rlhf_book.reward_model.encode_replies`). ``tokenizer``: the model's (it decides
    the format when it has a chat template; None: the plain format). ``chosen``, ``rejected``
    and every extra field are kept unchanged; the input records are not modified.

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
        out.append({**r, "prompt": format_prompt(r["prompt"], tokenizer)})
    if not out:
        raise ValueError(
            f"all {len(records)} pairs have an unterminated reply and were dropped; "
            "pass unterminated='keep' to keep them"
        )
    return out


def to_trl_dataset(records: Sequence[dict], unterminated: str = "drop", tokenizer=None):
    """:func:`to_trl_records` as a ``datasets.Dataset`` for TRL's DPOTrainer / RewardTrainer.

    The columns are every field of any record (``Dataset.from_list`` alone would keep
    only the first record's); a record without a field holds None there.
    """
    try:
        import datasets
    except ImportError as e:
        raise ImportError("to_trl_dataset needs the Hugging Face datasets library: pip install datasets") from e
    rows = to_trl_records(records, unterminated, tokenizer)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])


# ------------------------------------------------------------------- generation
@dataclass(frozen=True)
class PreferenceRecipe:
    """How many pairs to make and how.

    Each reply is sampled at a temperature drawn from ``temperatures`` with ``weights``;
    the annotators' Bradley-Terry temperature is ``annotator_temperature``. The prompts
    (the book's: the train prompts of ``prompt_split``) are split into ``prompt_fractions``
    for train / validation / test.
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
    """(response, terminated, end token or None) for ``prompts[i]`` at ``temperatures[i]``, batched per temperature.

    The end token is named only when a reply ended with a stop id other than the tokenizer's EOS.
    """
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
        lengths = roll.response_lengths.tolist()
        for i, text, term, ids, n in zip(chunk, roll.responses, roll.terminated.tolist(), roll.response_ids.tolist(), lengths):
            end = ids[n - 1] if term and n > 0 else None
            out[i] = (text, bool(term),
                      tokenizer.convert_ids_to_tokens(end) if end is not None and end != tokenizer.eos_token_id else None)
        bar.update(len(chunk))
    bar.close()
    return out


def generate_preferences(
    model,
    tokenizer,
    prompts: Sequence[str],
    n_pairs: int,
    annotator,
    gold_fn: Callable | None = None,
    temperatures: Sequence[float] = (1.0,),
    weights: Sequence[float] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Sample two replies per prompt from ``model`` and let ``annotator`` pick one; returns records.

    ``annotator``: an :class:`rlhf_book.gold.Annotator` or anything with its
    ``prefers_first(prompt, a, b, a_terminated, b_terminated) -> bool``. ``gold_fn``: a reward
    function ``(prompts, responses, terminated) -> (B,)``; when given, each record also holds
    ``chosen_gold`` / ``rejected_gold``. Prompts are used round-robin in a shuffled order.
    Pairs whose replies are identical (no preference to learn) or empty are skipped, so
    slightly fewer than ``n_pairs`` may come back.
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"n_pairs must be an integer >= 1, got {n_pairs!r}")
    prompts = prompt_texts(prompts)
    if not callable(getattr(annotator, "prefers_first", None)):
        raise ValueError(f"annotator must have a method prefers_first(prompt, a, b, a_terminated, b_terminated), "
                         f"got {type(annotator).__name__}")
    if gold_fn is not None and not callable(gold_fn):
        raise ValueError(f"gold_fn must be a reward function (prompts, responses, terminated) -> (B,) or None, "
                         f"got {gold_fn!r}")
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
    kept = [k for k in range(n_pairs) if _usable(replies[2 * k], replies[2 * k + 1])]
    if gold_fn is not None and kept:
        gold = _scores(gold_fn, [pair_prompts[k] for k in kept for _ in range(2)],
                       [replies[2 * k + j][0] for k in kept for j in range(2)],
                       [replies[2 * k + j][1] for k in kept for j in range(2)], "gold_fn")
    records = []
    for n, k in enumerate(kept):
        prompt = pair_prompts[k]
        (a, a_term, a_end), (b, b_term, b_end) = replies[2 * k], replies[2 * k + 1]
        first = annotator.prefers_first(prompt, a, b, a_term, b_term)
        sides = [{"text": a, "terminated": a_term, "temperature": temps[2 * k], "eos": a_end},
                 {"text": b, "terminated": b_term, "temperature": temps[2 * k + 1], "eos": b_end}]
        if gold_fn is not None:
            sides[0]["gold"], sides[1]["gold"] = round(gold[2 * n], 6), round(gold[2 * n + 1], 6)
        chosen, rejected = sides if first else sides[::-1]
        records.append(_record(prompt, chosen, rejected))
    return records


def _usable(a: tuple[str, bool], b: tuple[str, bool]) -> bool:
    """A pair worth labelling: two different, non-empty replies."""
    return a[0] != b[0] and bool(a[0].strip()) and bool(b[0].strip())


def _record(prompt: str, chosen: dict, rejected: dict) -> dict:
    """A preference record from the two sides ({"text", "terminated", "temperature"[, "gold"]})."""
    rec = {
        "prompt": prompt,
        "chosen": chosen["text"],
        "rejected": rejected["text"],
        "chosen_terminated": chosen["terminated"],
        "rejected_terminated": rejected["terminated"],
    }
    if "gold" in chosen:
        rec["chosen_gold"], rec["rejected_gold"] = chosen["gold"], rejected["gold"]
    rec["chosen_temperature"], rec["rejected_temperature"] = chosen["temperature"], rejected["temperature"]
    for side, d in (("chosen", chosen), ("rejected", rejected)):
        if d.get("eos") is not None:  # a stop token other than the tokenizer's EOS (only models with several)
            rec[f"{side}_eos"] = d["eos"]
    return rec


def _distinct(prompts: list) -> list:
    """The distinct prompts, sorted: strings as ``sorted(set(...))`` sorts them, then conversations (by their JSON)."""
    strings = sorted({p for p in prompts if isinstance(p, str)})
    convs = {json.dumps(p, sort_keys=True): p for p in prompts if not isinstance(p, str)}
    return strings + [convs[k] for k in sorted(convs)]


def split_prompts(prompts, fractions: Sequence[float] = (0.76, 0.12, 0.12), seed: int = 0) -> dict[str, list]:
    """The distinct ``prompts`` (strings or conversations), shuffled by ``seed``, as train / validation / test groups of ``fractions``."""
    texts = _distinct(prompt_texts(prompts))
    if len(texts) < 3:
        raise ValueError(f"prompts holds {len(texts)} distinct prompt(s); a train / validation / test split needs >= 3")
    random.Random(seed + 1).shuffle(texts)
    n_val = max(1, round(fractions[1] * len(texts)))
    n_test = max(1, round(fractions[2] * len(texts)))
    if n_val + n_test >= len(texts):
        raise ValueError(
            f"prompt_fractions {tuple(fractions)} leave no train prompt of the {len(texts)} distinct prompts"
        )
    return {"validation": texts[:n_val], "test": texts[n_val : n_val + n_test], "train": texts[n_val + n_test :]}


def _book_prompts(seed: int) -> list[str]:
    """The book's preference prompts: the RL train prompts of ``prompt_split(seed)``."""
    return [p["prompt"] for p in prompt_split(seed)[0]]


def _split_summary(records: Sequence[dict], n_prompts: int) -> dict:
    """Pairs and prompts of a split, and with gold fields how often the label agrees with gold (ties left out)."""
    out = {"pairs": len(records), "prompts": n_prompts}
    if records and all("chosen_gold" in r and "rejected_gold" in r for r in records):
        agree = [r["chosen_gold"] > r["rejected_gold"] for r in records if r["chosen_gold"] != r["rejected_gold"]]
        out["label_agrees_with_gold"] = round(sum(agree) / max(1, len(agree)), 4)
        out["gold_ties"] = len(records) - len(agree)
    return out


def build_preference_data(
    model, tokenizer, recipe: PreferenceRecipe, out_dir: str | Path, prompts=None, *, gold_fn: Callable,
    progress: bool = True,
) -> dict:
    """Generate the three splits with ``recipe`` and save ``<out_dir>/<split>.jsonl``; returns metadata.

    ``prompts``: strings or ``{"prompt": ...}`` records, split with :func:`split_prompts`
    (None: the book's, the RL train prompts of ``prompt_split(recipe.seed)``). ``gold_fn``:
    the reward function ``(prompts, responses, terminated) -> (B,)`` the simulated annotators
    sample from, also recorded as each reply's gold score (the book's:
    :func:`rlhf_book.gold.gold_rewards`). The metadata (also ``<out_dir>/metadata.json``) has
    per split the pairs, the prompts and, as the records hold gold scores, the agreement of
    labels with gold.
    """
    if not callable(gold_fn):
        raise ValueError(f"gold_fn must be a reward function (prompts, responses, terminated) -> (B,), got {gold_fn!r}")
    out_dir = Path(out_dir)
    pool = _book_prompts(recipe.seed) if prompts is None else prompts
    groups = split_prompts(pool, recipe.prompt_fractions, recipe.seed)
    sizes = {"train": recipe.n_train, "validation": recipe.n_validation, "test": recipe.n_test}
    meta = {"recipe": asdict(recipe), "splits": {}}
    for k, split in enumerate(SPLITS):
        annotator = Annotator(gold_fn, recipe.annotator_temperature, seed=recipe.seed + 7919 * (k + 1))
        recs = generate_preferences(
            model,
            tokenizer,
            groups[split],
            sizes[split],
            annotator,
            gold_fn=gold_fn,
            temperatures=recipe.temperatures,
            weights=recipe.weights,
            max_new_tokens=recipe.max_new_tokens,
            batch_size=recipe.batch_size,
            seed=recipe.seed + 104729 * (k + 1),
            progress=progress,
        )
        save_preferences(recs, out_dir / f"{split}.jsonl", tokenizer, _context_size(model))
        meta["splits"][split] = _split_summary(recs, len(groups[split]))
    (out_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    return meta


def _prompts_digest(prompts) -> str:
    """A short digest of the distinct prompt strings of ``prompts`` (order and repeats do not matter)."""
    texts = _distinct(prompt_texts(prompts))
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


def _check_base(base: str) -> None:
    from .base_model import PRESETS

    if base not in PREFERENCE_RECIPES or base not in PRESETS:
        raise ValueError(f"unknown base preset {base!r}; choose one of {', '.join(PREFERENCE_RECIPES)}")


def preference_data_key(base: str, prompts=None) -> str:
    """Cache key of base preset ``base``'s preference data: recipe, version, base LM's key (and the prompts' digest)."""
    from .base_model import PRESETS, artifact_name
    from .cache import artifact_key

    recipe = {"recipe": asdict(PREFERENCE_RECIPES[base]), "version": PREFERENCE_VERSION}
    if prompts is not None:
        recipe["prompts"] = _prompts_digest(prompts)
    return artifact_key("prefs", base, recipe, upstream=[artifact_name(base, PRESETS[base])])


def preference_data_path(base: str = "cpu", progress: bool = True, prompts=None) -> Path:
    """Directory of the cached preference data for base preset ``base`` (built on first use).

    ``prompts`` (strings or ``{"prompt": ...}`` records; None: the book's): the prompts the
    pairs are written for. Either way the base LM of ``base`` writes the replies and the
    book's gold annotators label them (:func:`rlhf_book.gold.gold_rewards`); for another
    gold or other annotators, call :func:`build_preference_data` or :func:`generate_preferences`.
    """
    from .base_model import load_base_model

    _check_base(base)
    if prompts is not None:
        split_prompts(prompts, PREFERENCE_RECIPES[base].prompt_fractions)  # bad prompts fail before anything slow
    recipe = PREFERENCE_RECIPES[base]

    def build(workdir: Path) -> dict:
        model, tokenizer = load_base_model(base, progress=progress)
        return build_preference_data(model, tokenizer, recipe, workdir, prompts, gold_fn=gold_rewards,
                                     progress=progress)

    return cached_artifact(preference_data_key(base, prompts), build)


def load_preference_data(base: str = "cpu", progress: bool = True, prompts=None) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...], "test": [...]}``: the records of :func:`preference_data_path`."""
    path = preference_data_path(base, progress, prompts)
    return {split: load_preferences(path / f"{split}.jsonl") for split in SPLITS}


def preference_data_info(base: str = "cpu", prompts=None, progress: bool = True) -> dict:
    """What the cached preference data's build measured: ``{"recipe", "splits": {split: {"pairs", "prompts", ...}}}``.

    Per split: ``pairs``, ``prompts`` (in its group) and, from the gold scores,
    ``label_agrees_with_gold`` (over pairs without a gold tie) and ``gold_ties``. Builds the data if needed.
    """
    return json.loads((preference_data_path(base, progress, prompts) / "metadata.json").read_text())


def write_sample(out_dir: str | Path = "data", base: str = "cpu", n: int = 16) -> Path:
    """Write ``<out_dir>/preferences_sample.jsonl``: the first ``n`` validation pairs of ``base``'s data."""
    records = load_preference_data(base)["validation"][:n]
    return save_preferences(records, Path(out_dir) / "preferences_sample.jsonl")


if __name__ == "__main__":  # python -m rlhf_book.preferences [OUT_DIR]: rewrite the shipped sample
    import sys

    print("wrote", write_sample(sys.argv[1] if len(sys.argv) > 1 else "data"))
