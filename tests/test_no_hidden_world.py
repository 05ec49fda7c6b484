"""A reader's own task (corpus, gold, annotators, prompts, prompt format) runs without the book's world.

``no_book_world`` (conftest.py) makes every entry point of the book's corpus and gold fail.
"""

import copy
import dataclasses
import random

import pytest
import torch

import rlhf_book
from rlhf_book import base_model as bm
from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.gold import Annotator
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.preferences import generate_preferences, split_prompts
from rlhf_book.reward_model import (
    normalize_reward_model,
    reward_fn_from_model,
    reward_model_from_lm,
    train_reward_model,
)
from rlhf_book.tokenizer import set_prompt_format

THINGS = ["garden", "museum", "bakery", "bridge", "library", "harbour", "station", "market"]
WORDS = ["quiet", "busy", "green", "old", "bright", "cold", "small", "grand"]


def _corpus(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt": f"Describe the {rng.choice(THINGS)}.",
         "response": f"It is {rng.choice(WORDS)} and {rng.choice(WORDS)}."}
        for _ in range(n)
    ]


def brightness(prompts, responses, terminated):
    """The reader's gold: count of 'bright' and 'grand', minus one for an unfinished reply."""
    return [sum(w in ("bright", "grand") for w in r.split()) - (0 if t else 1) for r, t in zip(responses, terminated)]


@pytest.fixture
def own_prompt_format():
    """The reader's prompt format, restored afterwards."""
    previous = set_prompt_format(lambda prompt, tokenizer: f"Q: {prompt}\nA:")
    yield
    set_prompt_format(previous)


def test_a_readers_pipeline_end_to_end(no_book_world, own_prompt_format):
    preset = dataclasses.replace(bm.PRESETS["tiny"], steps=30, batch_size=16, vocab_size=300, eval_every=15)
    texts = _corpus(480, seed=0)
    lm, tok, history = bm.train_base_model(texts, preset, device="cpu", progress=False, val_texts=_corpus(32, seed=1))
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert len(val) == 2 and val[-1] < val[0]
    assert tok.decode(bm.encode_examples(tok, texts[:1])[0]).startswith(f"Q: {texts[0]['prompt']}\nA:")

    groups = split_prompts([f"Describe the {t}." for t in THINGS])
    pools = {"train": (groups["train"], 48), "validation": (groups["validation"] + groups["test"], 16)}
    data = {
        split: generate_preferences(lm, tok, pool, n, Annotator(brightness, 0.5, seed=k), gold_fn=brightness,
                                    temperatures=(1.0, 1.5), max_new_tokens=12, seed=k, progress=False)
        for k, (split, (pool, n)) in enumerate(pools.items())
    }
    assert all(r["chosen_gold"] == brightness([r["prompt"]], [r["chosen"]], [r["chosen_terminated"]])[0]
               for r in data["train"])

    rm = reward_model_from_lm(lm)
    h = train_reward_model(rm, tok, data["train"], data["validation"], epochs=2, batch_size=8, lr=3e-3, progress=False)
    assert [r["epoch"] for r in h if "val_loss" in r] == [1, 2] and "val_gold_accuracy" in h[-1]
    gen = torch.Generator().manual_seed(0)
    ref = rlhf_book.generate(lm, tok, groups["train"] * 4, max_new_tokens=12, generator=gen)
    norm = normalize_reward_model(rm, tok, ref.prompts, ref.responses, ref.terminated)
    scores = reward_fn_from_model(rm, tok)(ref.prompts, ref.responses, ref.terminated)
    assert norm["n"] == len(ref) and abs(scores.mean().item()) < 1e-4

    # RL on the reader's world: the learned reward is optimised, the reader's own gold is only logged, and rises
    prompts = [f"Describe the {t}." for t in THINGS]
    for config in (PPOConfig(batch_size=8, minibatch_size=8, max_new_tokens=12, lr=3e-3, eval_every=0, progress=False),
                   A2CConfig(batch_size=8, max_new_tokens=12, lr=3e-3, eval_every=0, progress=False)):
        trainer_cls = PPOTrainer if isinstance(config, PPOConfig) else A2CTrainer
        trainer = trainer_cls(copy.deepcopy(lm), copy.deepcopy(lm), tok, reward_fn_from_model(rm, tok), config,
                              gold_fn=brightness)
        history = trainer.train(prompts, 10, eval_prompts=prompts * 4)
        first, last = history[0], history[-1]
        assert last["eval_gold_reward"] - first["eval_gold_reward"] > 0.3, (trainer_cls.__name__, first, last)
        assert last["eval_proxy_reward"] > first["eval_proxy_reward"]
        assert all("gold_reward" in h for h in history[1:])  # every training row logs the reader's gold


def test_trainers_have_no_default_reward_or_gold(tiny_world):
    lm, tok = tiny_world
    with pytest.raises(TypeError, match="reward_fn"):
        PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok)
    with pytest.raises(ValueError, match="reward_fn must be a function"):
        A2CTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, "gold")
    stats = PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, brightness,
                       PPOConfig(batch_size=4, minibatch_size=4, max_new_tokens=6, progress=False)).step(
        ["Describe the garden."] * 4)
    assert "gold_reward" not in stats  # no gold unless the caller gives one
