"""DPO: the loss and its variants by hand, log 2 at the start, padding invariance, the gradient's sign, the
reference computed once, minibatch accumulation, resume, TRL's columns, and a real run on the book's world."""

import copy
import math

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch
import torch.nn.functional as F

from rlhf_book.dpo import (LOSS_TYPES, DPOConfig, DPOTrainer, dpo_loss, encode_pairs, implicit_rewards, pair_logprobs,
                           reference_logprobs)

PAIRS = [
    {"prompt": "Describe the garden.", "chosen": "It is bright and grand.", "rejected": "It is cold."},
    {"prompt": "Describe the bridge.", "chosen": "It is grand.", "rejected": "It is old and cold and quiet and green."},
    {"prompt": "Describe the museum.", "chosen": "It is bright.", "rejected": "It is quiet.", "rejected_terminated": False},
    {"prompt": "Describe the garden.", "chosen": "It is grand and bright and quiet.", "rejected": "It is old and cold."},
]

# fixed summed log-probs of 2 pairs: policy chosen / rejected, reference chosen / rejected, reply lengths
LC, LR, RC, RR = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -3.5])
NC, NR = torch.tensor([5.0, 2.0]), torch.tensor([6.0, 4.0])


def test_sigmoid_loss_matches_the_hand_computed_value():
    # pair 0: log-ratios +1 (chosen) and -0.5 (rejected): delta 1.5, beta 0.1 -> -log sigmoid(0.15) = 0.62096
    # pair 1: log-ratios +1 and +0.5: delta 0.5 -> -log sigmoid(0.05) = 0.66846
    losses, rc, rr = dpo_loss(LC, LR, RC, RR, beta=0.1)
    torch.testing.assert_close(losses, torch.tensor([0.620957, 0.668460]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rc, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(rr, torch.tensor([-0.05, 0.05]))
    torch.testing.assert_close(implicit_rewards(LC, RC, 0.1), rc)


def test_variants_match_their_formulas():
    beta = 0.2
    dc, dr = LC - RC, LR - RR  # log-ratios
    hinge, _, _ = dpo_loss(LC, LR, RC, RR, beta, "hinge")
    torch.testing.assert_close(hinge, torch.relu(1 - beta * (dc - dr)))
    avg = dc / NC - dr / NR
    ipo, _, _ = dpo_loss(LC, LR, RC, RR, beta, "ipo", NC, NR)
    torch.testing.assert_close(ipo, (avg - 1 / (2 * beta)) ** 2)
    # by hand for pair 0: avg = 1/5 + 0.5/6 = 0.28333; (0.28333 - 2.5)^2 = 4.9136
    assert ipo[0].item() == pytest.approx(4.91361, abs=1e-4)
    norm, _, _ = dpo_loss(LC, LR, RC, RR, beta, "sigmoid_norm", NC, NR)
    torch.testing.assert_close(norm, -F.logsigmoid(beta * avg))
    simpo, rc, _ = dpo_loss(LC, LR, None, None, beta, "simpo", NC, NR, simpo_gamma=0.5)
    torch.testing.assert_close(simpo, -F.logsigmoid(beta * (LC / NC - LR / NR) - 0.5))
    torch.testing.assert_close(rc, beta * LC / NC)
    sft, _, _ = dpo_loss(LC, LR, None, None, beta, "sft", NC, NR)  # the chosen reply's per-token NLL, nothing else
    torch.testing.assert_close(sft, -LC / NC)
    LC_grad, LR_grad = LC.clone().requires_grad_(True), LR.clone().requires_grad_(True)
    dpo_loss(LC_grad, LR_grad, None, None, beta, "sft", NC, NR)[0].sum().backward()
    torch.testing.assert_close(LC_grad.grad, -1 / NC)  # d/d log pi(y_w) of -log pi(y_w) / |y_w|
    assert LR_grad.grad is None  # the rejected reply plays no part


def test_bad_arguments_name_what_is_missing():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(LC, LR, RC, RR, 0.1, "kto")
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(LC, LR, RC, RR, 0.1, "ipo")
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(LC, LR, None, None, 0.1, "sigmoid")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(LC, LR, RC, RR, 0.0)
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=-1.0)
    with pytest.raises(ValueError, match="minibatch_size"):
        DPOConfig(batch_size=4, minibatch_size=8)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "sft"])  # sft: no rejected term (above)
def test_the_gradient_raises_the_chosen_margin(loss_type):
    chosen, rejected = LC.clone().requires_grad_(True), LR.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(chosen, rejected, RC, RR, 0.1, loss_type, NC, NR)
    losses.sum().backward()
    # gradient descent moves chosen log-probs up and rejected ones down
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_at_the_reference_the_loss_is_log2_and_the_rewards_are_zero(tiny_world):
    lm, tok = tiny_world
    policy, ref = copy.deepcopy(lm), copy.deepcopy(lm)
    batch = encode_pairs(tok, PAIRS)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(policy, batch)
    ref_lp = reference_logprobs(ref, tok, PAIRS)
    losses, rc, rr = dpo_loss(chosen, rejected, ref_lp[:, 0], ref_lp[:, 1], beta=0.1)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)))
    assert rc.abs().max() < 1e-6 and rr.abs().max() < 1e-6


def test_encode_pairs_appends_eos_unless_unterminated_and_is_padding_invariant(tiny_world):
    lm, tok = tiny_world
    batch = encode_pairs(tok, PAIRS)
    assert len(batch) == 8 and batch.terminated.tolist() == [True] * 6 + [False, True]
    eos_rows = [(ids[m.bool()][-1] == tok.eos_token_id).item() for ids, m in zip(batch.response_ids, batch.response_mask)]
    assert eos_rows == batch.terminated.tolist()
    with torch.no_grad():
        together = torch.stack(pair_logprobs(lm, batch), 1)
        alone = torch.cat([torch.stack(pair_logprobs(lm, encode_pairs(tok, [p])), 1) for p in PAIRS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # the reference's log-probs in batches of 1 and of 3 are the same numbers
    torch.testing.assert_close(reference_logprobs(lm, tok, PAIRS, batch_size=1),
                               reference_logprobs(lm, tok, PAIRS, batch_size=3), atol=1e-5, rtol=1e-5)


def _trainer(tiny_world, **overrides):
    lm, tok = tiny_world
    torch.manual_seed(0)
    cfg = dict(batch_size=2, lr=1e-3, beta=0.5, max_new_tokens=8, eval_every=2, checkpoint_every=2, progress=False)
    return DPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, DPOConfig(**{**cfg, **overrides}))


def test_training_raises_the_margin_and_runs_the_reference_once(tiny_world):
    tr = _trainer(tiny_world)
    calls = []
    tr.ref.register_forward_hook(lambda *a: calls.append(1))
    history = tr.train(PAIRS, epochs=4, eval_pairs=PAIRS)
    assert len(calls) == 1  # one reference pass for the data set (train and eval pairs are the same set)
    assert [h["step"] for h in history] == list(range(9)) and history[-1]["epoch"] == 4.0
    assert history[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["val_reward_margin"] > 0.2 and history[-1]["val_accuracy"] == 1.0
    assert history[-1]["val_loss"] < math.log(2) - 0.05


@pytest.mark.parametrize("split", [{"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 3},
                                   {"minibatch_size": 1}])  # minibatch_size: deprecated since 0.2.0
def test_minibatches_accumulate_to_the_whole_batch_gradient(tiny_world, split):
    a, b = _trainer(tiny_world, batch_size=4), _trainer(tiny_world, batch_size=4, **split)
    ha, hb = a.train(PAIRS, 1), b.train(PAIRS, 1)
    assert ha[-1]["loss"] == pytest.approx(hb[-1]["loss"], abs=1e-5)  # forwards of 1 and 4 rows round apart
    assert ha[-1]["grad_norm"] == pytest.approx(hb[-1]["grad_norm"], rel=1e-4)
    for pa, pb in zip(a.lm.parameters(), b.lm.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tiny_world, tmp_path):
    full = _trainer(tiny_world).train(PAIRS, epochs=3, eval_prompts=["Describe the garden."])
    _trainer(tiny_world).train(PAIRS, epochs=1, checkpoint_dir=tmp_path)  # stops after 2 steps
    resumed = _trainer(tiny_world).train(PAIRS, epochs=3, checkpoint_dir=tmp_path, eval_prompts=["Describe the garden."])
    after = lambda h: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in h if r["step"] > 2]  # noqa: E731
    assert len(after(full)) == 4 and after(resumed) == after(full)  # steps 3-6, evaluations included
    with pytest.raises(ValueError, match="beta"):
        _trainer(tiny_world, beta=0.9).train(PAIRS, epochs=3, checkpoint_dir=tmp_path)


def test_trl_columns_and_bad_records(tiny_world):
    """Records with only TRL's three columns train as they are (a missing *_terminated means: ended with EOS)."""
    records = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in PAIRS]
    history = _trainer(tiny_world).train(records, epochs=1)
    assert len(history) == 2 and all(h["loss"] > 0 for h in history)
    with pytest.raises(ValueError, match="record 1: missing field 'rejected'"):
        _trainer(tiny_world).train([records[0], {"prompt": "x", "chosen": "y"}], epochs=1)
    with pytest.raises(ValueError, match="record 0: fields 'chosen' and 'rejected' are the same text"):
        _trainer(tiny_world).train([{"prompt": "x", "chosen": "y", "rejected": "y"}], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        _trainer(tiny_world).train(records, epochs=-1)


def test_evaluation_is_the_rl_trainers_protocol(tiny_world):
    """Held-out replies scored by proxy and gold, KL by the same estimator: DPO and PPO land on one plot."""
    reward = lambda prompts, responses, terminated: [r.count("bright") for r in responses]  # noqa: E731
    tr = _trainer(tiny_world)
    tr.reward_fn, tr.gold_fn = reward, reward
    out = tr.evaluate(["Describe the garden."] * 3)
    assert {"eval_proxy_reward", "eval_gold_reward", "eval_kl", "eval_kl_k3", "eval_samples"} <= set(out)
    assert abs(out["eval_kl"]) < 1e-5  # the policy is still the reference


@pytest.mark.slow
def test_dpo_on_the_book_world_raises_accuracy_and_gold():
    """Half an epoch on chapter 2's pairs: held-out pair accuracy >= 0.70 and the gold reward up by >= 0.25."""
    from rlhf_book import gold_reward_fn, load_base_model, prompt_split
    from rlhf_book.preferences import load_preference_data

    data = load_preference_data("cpu", progress=False)
    _, eval_prompts = prompt_split(0)
    policy, tok = load_base_model("cpu", progress=False)
    ref, _ = load_base_model("cpu", progress=False)
    cfg = DPOConfig(beta=0.1, lr=1e-4, batch_size=32, eval_every=1000, progress=False)
    history = DPOTrainer(policy, ref, tok, cfg, gold_fn=gold_reward_fn).train(
        data["train"], epochs=0.5, eval_prompts=eval_prompts * 2, eval_pairs=data["validation"])
    start, end = history[0], history[-1]
    assert end["val_accuracy"] >= 0.70, end["val_accuracy"]
    assert end["eval_gold_reward"] - start["eval_gold_reward"] >= 0.25, (start["eval_gold_reward"], end["eval_gold_reward"])
    assert end["eval_kl"] < 5.0


def test_batches_are_a_function_of_seed_and_step(tiny_world):
    """Each epoch is one permutation seeded by (seed, epoch): the global RNG does not change it."""
    a = _trainer(tiny_world, batch_size=3)
    torch.manual_seed(123)
    first = [a.batch_rows(s, 10) for s in range(8)]
    torch.manual_seed(456)
    assert [a.batch_rows(s, 10) for s in range(8)] == first
    for epoch in range(2):  # 4 steps an epoch (3 + 3 + 3 + 1): every pair exactly once
        assert sorted(i for rows in first[4 * epoch: 4 * epoch + 4] for i in rows) == list(range(10))
    assert first[:4] != first[4:]  # a new order every epoch
    assert [_trainer(tiny_world, batch_size=3, seed=1).batch_rows(s, 10) for s in range(4)] != first[:4]
