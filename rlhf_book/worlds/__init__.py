"""The book's worlds, one registry: every world is built, cached, loaded, prompted and scored the same way.

A *world* is a task the library trains on with nothing from outside: a generator of texts, a
policy trained from scratch on them and cached (:func:`rlhf_book.cache.cached_artifact`: atomic,
a killed build resumes), prompts with a held-out split, and rewards. Two ship with the book:

* ``"reviews"`` (chapters 1-8): short reviews with a gold reward known only to the simulator
  and a learned reward model (:mod:`rlhf_book.worlds.reviews` wraps the build chain that lives
  in ``corpus``, ``gold``, ``base_model``, ``preferences`` and ``reward_model``);
* ``"arithmetic"`` (chapter 9): arithmetic problems whose scratchpad and final answer a program
  checks (:mod:`rlhf_book.worlds.arithmetic`).

::

    world = get_world("arithmetic")
    world.build("cpu")                           # trains and caches the policy, once
    policy, tok = world.load_policy("cpu")
    train, held_out = world.prompts("train"), world.prompts("eval", n=64)
    reward_fn = world.reward_fn("cpu", "strict")   # (prompts, responses, terminated) -> (B,)

A model named ``"WORLD:PRESET"`` (``"arithmetic:tiny"``) is a world's policy wherever the command
line takes a model (:func:`split_model_name`, :func:`load_model`). The algorithm modules import no
world (``tests/test_world_imports.py`` parses their imports): a world reaches them only as a
policy, prompts and a reward function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BOOK_WORLD", "WORLD_MODULES", "World", "canonical_model_name", "get_world", "load_model", "split_model_name",
           "world_names"]


@dataclass(frozen=True)
class World:
    """A task as one unit: its presets and rewards, and the four calls that build, load, prompt and score.

    ``build(preset, device=None, progress=True) -> {artifact: path}``;
    ``load_policy(preset, device=None, progress=True, dtype="auto") -> (model, tokenizer)``;
    ``prompts(split="train" | "eval", n=None, seed=0) -> [prompt]``;
    ``reward_fn(preset, kind, device=None, progress=True) -> reward function`` (``kind``: one of ``rewards``,
    the first the default); ``gold_fn``: the reward a run is judged by, logged beside the one it optimises.
    """

    name: str
    description: str
    presets: tuple[str, ...]
    rewards: tuple[str, ...]
    build: Callable[..., dict]
    load_policy: Callable[..., tuple]
    prompts: Callable[..., list]
    reward_fn: Callable[..., Callable]
    gold_fn: Callable | None = None
    modules: tuple[str, ...] = ()  # what makes up the world; no algorithm module may import one


# name -> the module holding its WORLD (imported on first use, so importing the registry loads no world)
WORLD_MODULES: dict[str, str] = {
    "reviews": "rlhf_book.worlds.reviews",
    "arithmetic": "rlhf_book.worlds.arithmetic",
}


# the world of chapters 1-8, whose policies the library also names by their bare preset (load_base_model("cpu"))
BOOK_WORLD = "reviews"


def world_names() -> list[str]:
    """The registered worlds' names."""
    return list(WORLD_MODULES)


def get_world(name: str) -> World:
    """The :class:`World` called ``name`` (``"reviews"``, ``"arithmetic"``); ValueError naming the known ones."""
    if name not in WORLD_MODULES:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(WORLD_MODULES)}")
    return importlib.import_module(WORLD_MODULES[name]).WORLD


def split_model_name(name) -> tuple[str, str] | None:
    """``("arithmetic", "tiny")`` for ``"arithmetic:tiny"``; None for anything else (a path, a hub name, a preset)."""
    if not isinstance(name, str) or name.count(":") != 1:
        return None
    world, preset = name.split(":")
    if world not in WORLD_MODULES:
        return None
    if preset not in get_world(world).presets:
        raise ValueError(f"{name!r}: the {world} world has no preset {preset!r}; "
                         f"its presets: {', '.join(get_world(world).presets)}")
    return world, preset


def canonical_model_name(name):
    """The one name of a model: ``"cpu"`` for ``"reviews:cpu"`` (the book's world's presets go by their bare name),
    anything else as it is (``"arithmetic:tiny"``, a path, a hub name)."""
    parts = split_model_name(name)
    return parts[1] if parts is not None and parts[0] == BOOK_WORLD else name


def load_model(name: str, device=None, progress: bool = True, dtype="auto"):
    """``(model, tokenizer)`` of ``"WORLD:PRESET"``: that world's policy, built and cached on first use."""
    parts = split_model_name(name)
    if parts is None:
        raise ValueError(f"{name!r} is not 'WORLD:PRESET' (worlds: {', '.join(WORLD_MODULES)})")
    return get_world(parts[0]).load_policy(parts[1], device=device, progress=progress, dtype=dtype)
