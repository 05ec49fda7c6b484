import os

import torch

import rlhf_book


def test_import_sets_passive_wait_policy():
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_get_device(monkeypatch):
    monkeypatch.delenv("RLHF_BOOK_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert rlhf_book.get_device().type == expected
    monkeypatch.setenv("RLHF_BOOK_DEVICE", "cpu")
    assert rlhf_book.get_device().type == "cpu"


def test_set_seed_makes_runs_repeatable():
    rlhf_book.set_seed(3)
    a = torch.randn(5)
    rlhf_book.set_seed(3)
    assert torch.equal(a, torch.randn(5))


def test_configure_threads():
    n = torch.get_num_threads()
    try:
        assert rlhf_book.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)
