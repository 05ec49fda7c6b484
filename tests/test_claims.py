"""rlhf_book.claims: a sentence's number or comparison fails loudly when the computed values contradict it."""

import pytest

from rlhf_book.claims import ClaimError, Claims, matches


@pytest.mark.parametrize("value,stated,ok", [
    (0.7852, "0.785", True), (0.7855, "0.785", True), (0.7856, "0.785", False), (0.7843, "0.785", False),
    (23.6, "24", True), (24.49, "24", True), (24.6, "24", False), (-0.381, "-0.38", True), (0.38, "-0.38", False),
    (0.0012, "1e-3", True), (0.0016, "1e-3", False), (1.0, "1.00", True),
])
def test_a_number_matches_at_the_precision_written(value, stated, ok):
    assert matches(value, stated) is ok


def test_a_tolerance_replaces_the_written_precision():
    assert matches(26.0, "20", tol=10) and not matches(31.0, "20", tol=10)


def test_each_kind_of_claim_passes_and_fails(capsys):
    c = Claims("9.1")
    c.number("accuracy reaches 0.785", 0.7851, "0.785")
    c.numbers("gold ends at 0.26-0.47", [0.262, 0.468], ["0.26", "0.47"])
    c.between("about 1 nat", 1.2, 0.5, 1.5)
    c.greater("RLOO is higher", 0.8, 0.7)
    c.ahead("ahead by more than the spread", [0.8, 0.82, 0.85], [0.7, 0.75, 0.79])
    c.tie("a tie", [0.8, 0.82], [0.81, 0.9])
    c.holds("every run lengthens its replies", all(x > 18 for x in (21, 28)))
    c.done()
    assert capsys.readouterr().out == "section 9.1: 7 claims of the text hold\n"
    with pytest.raises(ClaimError, match=r'section 9.1: the text says "accuracy reaches 0.79", but the computed value is 0.7841'):
        c.number("accuracy reaches 0.79", 0.7841, "0.79")
    with pytest.raises(ClaimError, match="overlap"):
        c.ahead("full data ahead by more than the spread", [0.828, 0.852], [0.800, 0.829])
    with pytest.raises(ClaimError, match="do not overlap"):
        c.tie("a tie", [0.5, 0.6], [0.7, 0.8])
    with pytest.raises(ClaimError, match="outside"):
        c.between("under 2 nats", 2.3, 0, 2)
    with pytest.raises(ClaimError, match="not above"):
        c.greater("larger beta peaks higher", 0.66, 0.74)
    with pytest.raises(ClaimError, match="does not hold"):
        c.holds("draws agree within 10%", abs(158.7 / 113.4 - 1) < 0.1)
    with pytest.raises(AssertionError):  # nbval fails a cell on any AssertionError
        c.number("x", 1.0, "2")
    with pytest.raises(ValueError):
        c.numbers("x", [1.0], ["1", "2"])
    with pytest.raises(ValueError):
        c.ahead("x", [], [1.0])


def test_tensors_that_require_grad_and_one_claim(capsys):
    import torch
    c = Claims("1.1")
    c.number("x is 0.5", torch.tensor(0.5, requires_grad=True) * 1.0, "0.5")
    c.done()
    out = capsys.readouterr()
    assert out.out == "section 1.1: 1 claim of the text holds\n" and out.err == ""


def test_an_author_can_list_every_false_claim_of_a_cell(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_BOOK_CLAIMS", "all")
    c = Claims("9.1")
    c.number("accuracy 0.80", 0.7, "0.80")
    c.number("loss 0.5", 0.5, "0.5")
    c.holds("it converges", False)
    with pytest.raises(ClaimError, match=r"(?s)2 claims of the text are false.*accuracy 0.80.*it converges"):
        c.done()
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RLHF_BOOK_CLAIMS")
    with pytest.raises(ClaimError, match="accuracy 0.80"):
        Claims("9.1").number("accuracy 0.80", 0.7, "0.80")
