"""The book's first world (chapters 1-8), as a registry entry: short reviews, a gold reward, a learned reward model.

Nothing moves: the generator is :mod:`rlhf_book.corpus` (part 1), the gold reward :mod:`rlhf_book.gold`
(part 2), and the build chain stays in ``base_model`` (the base LM), ``preferences`` (the pairs)
and ``reward_model`` (the RM), each cached under its own key. This module only gives them the
:class:`~rlhf_book.worlds.World` shape, so that a chapter or the command line builds, loads,
prompts and scores this world exactly as it does the arithmetic one. Every call is the one the
chapters make today (``load_base_model(preset)``, ``prompt_split(seed, n_eval)``,
``load_reward_model(preset)``), so the results are the same, cache keys included.
"""

from __future__ import annotations

from ..base_model import PRESETS, base_model_path, load_base_model
from ..corpus import prompt_split
from ..gold import gold_reward_fn
from ..preferences import preference_data_path
from ..reward_model import load_reward_model, reward_fn_from_model, reward_model_path
from . import World

__all__ = ["WORLD", "build", "load_policy", "prompts", "reward_fn"]


def build(preset: str = "cpu", device=None, progress: bool = True) -> dict:
    """Build (once) and cache the base LM, the preference data and the reward model of ``preset``; their paths."""
    load_reward_model(preset, device=device, progress=progress)  # builds the base LM and the pairs first
    return {"base": base_model_path(preset), "preferences": preference_data_path(preset, progress=False),
            "reward_model": reward_model_path(preset)}


def load_policy(preset: str = "cpu", device=None, progress: bool = True, dtype="auto"):
    """``(model, tokenizer)`` of the base LM of ``preset``: :func:`rlhf_book.load_base_model`."""
    return load_base_model(preset, device=device, progress=progress, dtype=dtype)


def prompts(split: str = "train", n: int | None = None, seed: int = 0) -> list[str]:
    """The RL prompts of :func:`rlhf_book.corpus.prompt_split` (``seed``): "train", or "eval" (``n`` held out, default 32)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train, held_out = prompt_split(seed, 32 if n is None else n)
    rows = train if split == "train" else held_out
    return [r["prompt"] for r in (rows if n is None or split == "eval" else rows[:n])]


def reward_fn(preset: str = "cpu", kind: str = "model", device=None, progress: bool = True):
    """The learned reward model of ``preset`` (``kind="model"``, normalised) or the gold reward (``"gold"``)."""
    if kind == "gold":
        return gold_reward_fn
    if kind != "model":
        raise ValueError(f"the reviews world's rewards are ['model', 'gold'], got {kind!r}")
    return reward_fn_from_model(*load_reward_model(preset, device=device, progress=progress))


WORLD = World(
    name="reviews", description="short reviews with a simulated gold reward and a learned reward model (chapters 1-8)",
    presets=tuple(PRESETS), rewards=("model", "gold"), build=build, load_policy=load_policy, prompts=prompts,
    reward_fn=reward_fn, gold_fn=gold_reward_fn,
    modules=("rlhf_book.corpus", "rlhf_book.gold", "rlhf_book.worlds.reviews"),
)
