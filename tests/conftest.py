import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of timing out

import pytest  # noqa: E402

import rlhf_book  # noqa: E402,F401  (before torch)
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def no_book_world(monkeypatch):
    """Every entry point of the book's corpus and gold fails, so a test sees any silent use of them."""
    from rlhf_book import base_model, corpus, gold, preferences, reward_model

    def fail(*a, **k):
        pytest.fail("the book's world was used")

    for module, name in [(corpus, "generate_examples"), (corpus, "prompt_split"), (corpus, "sample_prompts"),
                         (corpus, "all_prompts"), (base_model, "generate_examples"), (preferences, "prompt_split"),
                         (reward_model, "prompt_split"), (preferences, "gold_rewards"), (gold, "gold_score")]:
        monkeypatch.setattr(module, name, fail)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty artifact cache for this test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(d))
    return d


@pytest.fixture
def kill_before_rename(monkeypatch):
    """The cache's ``os.rename`` raises KeyboardInterrupt on a finished build's ``.partial`` folder (a kill after the
    build saved everything, before it is renamed into place); call the returned function to undo it."""
    from rlhf_book import cache as cache_mod

    real_rename = cache_mod.os.rename

    def die(src, dst):
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt("killed just before the finished build is renamed into place")
        real_rename(src, dst)

    monkeypatch.setattr(cache_mod.os, "rename", die)
    return lambda: monkeypatch.setattr(cache_mod.os, "rename", real_rename)


@pytest.fixture
def kill_after_first_checkpoint(monkeypatch):
    """``kill(module, build)``: run ``build()`` until ``module`` has written its first checkpoint, then raise
    KeyboardInterrupt as a kill would (the checkpoint on disk, the build unfinished)."""

    def kill(module, build) -> None:
        real = module.save_checkpoint

        def save_then_die(path, **state):
            real(path, **state)
            raise KeyboardInterrupt("killed")

        monkeypatch.setattr(module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            build()
        monkeypatch.setattr(module, "save_checkpoint", real)

    return kill


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory):
    """A private cache directory shared by the session's tiny artifacts."""
    return tmp_path_factory.mktemp("tiny_cache")


def _in_cache(d, fn):
    old = os.environ.get("RLHF_BOOK_CACHE")
    os.environ["RLHF_BOOK_CACHE"] = str(d)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("RLHF_BOOK_CACHE", None)
        else:
            os.environ["RLHF_BOOK_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_world(tiny_cache_dir):
    """(model, tokenizer) of the tiny preset, built once per session in a private cache."""
    return _in_cache(tiny_cache_dir, lambda: rlhf_book.load_base_model("tiny", device="cpu", progress=False))


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_cache_dir, tiny_world):
    """Directories of the tiny base LM and reward model as the cache saved them: {"base": Path, "rm": Path}."""
    from rlhf_book.base_model import base_model_path
    from rlhf_book.reward_model import load_reward_model, reward_model_path

    def build():
        load_reward_model("tiny", device="cpu", progress=False)
        return {"base": base_model_path("tiny"), "rm": reward_model_path("tiny")}

    return _in_cache(tiny_cache_dir, build)


@pytest.fixture(scope="session")
def cpu_world():
    """(model, tokenizer) of the book's cpu preset from the default cache (built on first use)."""
    return rlhf_book.load_base_model("cpu", device="cpu", progress=False)


@pytest.fixture(scope="session")
def arithmetic_tiny(tmp_path_factory):
    """(model, tokenizer) of the arithmetic world's ``tiny`` policy, built once per session in a cache of its own
    (builds are deterministic); tests that change the model work on a copy."""
    import os

    from rlhf_book.worlds import arithmetic

    old = os.environ.get("RLHF_BOOK_CACHE")
    os.environ["RLHF_BOOK_CACHE"] = str(tmp_path_factory.mktemp("arithmetic_tiny"))
    try:
        return arithmetic.load_policy("tiny", device="cpu", progress=False)
    finally:
        if old is None:
            os.environ.pop("RLHF_BOOK_CACHE", None)
        else:
            os.environ["RLHF_BOOK_CACHE"] = old
