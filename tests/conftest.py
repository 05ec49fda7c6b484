import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of timing out

import pytest  # noqa: E402

import rlhf_book  # noqa: E402,F401  (before torch)
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty artifact cache for this test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(d))
    return d


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(model, tokenizer) of the tiny preset, built once per session in a private cache."""
    d = tmp_path_factory.mktemp("tiny_cache")
    old = os.environ.get("RLHF_BOOK_CACHE")
    os.environ["RLHF_BOOK_CACHE"] = str(d)
    try:
        model, tok = rlhf_book.load_base_model("tiny", device="cpu", progress=False)
    finally:
        if old is None:
            os.environ.pop("RLHF_BOOK_CACHE", None)
        else:
            os.environ["RLHF_BOOK_CACHE"] = old
    return model, tok


@pytest.fixture(scope="session")
def cpu_world():
    """(model, tokenizer) of the book's cpu preset from the default cache (built on first use)."""
    return rlhf_book.load_base_model("cpu", device="cpu", progress=False)
