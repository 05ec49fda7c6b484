"""Process rewards: a reward at the end of each step (StepReward), placed on tokens, credited by GAE or a group."""

import copy

import pytest
import torch

from rlhf_book.advantage import gae, process_advantages
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.experience import make_experience
from rlhf_book.rewards import StepReward, StepRewards, char_end_tokens
from rlhf_book.rollout import generate
from rlhf_book.worlds import arithmetic as A

Q = "What is 47 + 85?"  # answer 132; reference: 7 + 5 = 12 / 4 + 8 + 1 = 13 / #### 132


# ------------------------------------------------------------------ the advantage, by hand
def test_process_advantages_by_hand():
    # one group of two replies, steps ending at columns 1 and 3 (row 0) and 2 (row 1)
    values = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ends = torch.tensor([[False, True, False, True], [False, False, True, False]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    adv = process_advantages(values, ends, mask, group_size=2, eps=0.0)
    r = torch.tensor([1.0, 0.0, 0.0])  # the group's three step rewards: mean 1/3, std (unbiased) 1/sqrt(3)
    z = (r - r.mean()) / r.std()
    want = torch.tensor([[z[0] + z[1], z[0] + z[1], z[1], z[1]], [z[2], z[2], z[2], 0.0]])
    torch.testing.assert_close(adv, want)


def test_process_advantages_of_a_group_with_equal_step_rewards_are_zero():
    values = torch.tensor([[0.5, 0.5], [0.5, 0.0], [1.0, 0.0], [0.0, 0.0]])
    ends = torch.tensor([[True, True], [True, False], [True, False], [True, False]])
    adv = process_advantages(values, ends, torch.ones(4, 2), group_size=2)
    assert adv[:2].abs().max() == 0  # group 1: every step reward 0.5
    assert adv[2, 0] > 0 > adv[3, 0]  # group 2: the better reply is pushed up
    equal = torch.full((1, 7), 0.1)  # float32's mean of seven 0.1 is not 0.1 exactly: still exact zeros
    assert process_advantages(equal, torch.ones(1, 7, dtype=torch.bool), torch.ones(1, 7), group_size=1).abs().max() == 0


def test_process_advantages_errors():
    with pytest.raises(ValueError, match="not groups of group_size=2"):
        process_advantages(torch.zeros(3, 2), torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2), 2)
    with pytest.raises(ValueError, match="step_ends has shape"):
        process_advantages(torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2), 2)


# ------------------------------------------------------------------ the reward and its tokens
def test_the_arithmetic_process_reward_sums_to_the_outcome_on_a_correct_reply():
    ref = A.reference_reply(A.parse_problem(Q))
    spans = A.process_steps(Q, ref)
    assert [c for c, _ in spans] == [10, 25, len(ref)] and sum(v for _, v in spans) == pytest.approx(1.0)
    useless = "7 + 5 = 12\n1 + 1 = 2\n#### 132"  # a true step off the path earns nothing, the answer still does
    assert [v for _, v in A.process_steps(Q, useless)] == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert [v for _, v in A.process_steps(Q, ref, False)][-1] == 0.0  # cut off: no answer reward
    torch.testing.assert_close(A.process_reward([Q, Q], [ref, useless], None), torch.tensor([1.0, 2 / 3]))


def test_step_reward_errors_name_the_row():
    bad_end = StepReward(lambda p, r, t: [(len(r) + 5, 1.0)], name="bad_end")
    with pytest.raises(ValueError, match=r"bad_end: row 0: a step's end must be a character offset in 0\.\.2"):
        bad_end(["q"], ["ab"], None)
    nan = StepReward(lambda p, r, t: [(0, float("nan"))], name="nan_step")
    with pytest.raises(ValueError, match="nan_step: row 0: a step's reward must be a finite number"):
        nan(["q"], ["ab"], None)
    with pytest.raises(ValueError, match="steps must be a function"):
        StepReward(3)


def _line_spans(text):
    """(start, line) of each line of ``text``."""
    out, pos = [], 0
    for line in text.split("\n"):
        out.append((pos, line))
        pos += len(line) + 1
    return out


@pytest.fixture
def tiny(arithmetic_tiny):
    return arithmetic_tiny


def test_char_offsets_land_on_the_token_that_ends_the_step(tiny):
    _, tok = tiny
    reply = A.reference_reply(A.parse_problem(Q))
    ids = tok(reply)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    cols = char_end_tokens(tok, ids, [10, 25, len(reply)], stop_ids=[tok.eos_token_id, tok.pad_token_id])
    for c, col in zip([10, 25, len(reply)], cols):
        assert tok.decode(ids[: col + 1]).startswith(reply[:c])  # the step is complete at col...
        assert not tok.decode(ids[:col]).startswith(reply[:c])  # ...and not one token before


def test_step_rewards_on_tokens_and_gae_credits_each_step(tiny):
    """With gamma = lam = 1, V = 0, beta = 0: the advantage at a token is the sum of the step rewards from it on."""
    policy, tok = tiny
    torch.manual_seed(0)
    prompts = [A.Problem((47, 85), ("+",)).prompt, A.Problem((3, 4), ("+",)).prompt]
    ro = generate(policy, tok, prompts, max_new_tokens=24, temperature=1.0,
                  generator=torch.Generator().manual_seed(0), samples_per_prompt=2)
    steps = A.process_reward.token_rewards(ro, tok)
    assert steps.values.shape == ro.response_mask.shape and not bool((steps.ends & ~ro.response_mask.bool()).any())
    last = ro.response_mask.sum(1) - 1  # the answer's reward goes on the reply's last token (its EOS when it ended)
    answers = torch.tensor([A.process_steps(p, r, t)[-1][1] for p, r, t in zip(ro.prompts, ro.responses,
                                                                                  ro.terminated.tolist())])
    torch.testing.assert_close(steps.values[torch.arange(len(last)), last], answers)
    assert bool(steps.ends[torch.arange(len(last)), last].all())
    sums = (steps.values * ro.response_mask).sum(1)
    torch.testing.assert_close(sums, A.process_reward(ro.prompts, ro.responses, ro.terminated))
    torch.testing.assert_close(steps.totals, A.process_reward(ro.prompts, ro.responses, ro.terminated))
    exp = make_experience(ro, A.process_reward, policy, None, gamma=1.0, lam=1.0, step_rewards=steps)
    want, _ = gae(steps.values, torch.zeros_like(steps.values), ro.response_mask, 1.0, 1.0)
    torch.testing.assert_close(exp.advantages, want)
    torch.testing.assert_close(exp.scores, sums)
    outcome = make_experience(ro, A.process_reward, policy, None, gamma=1.0, lam=1.0)  # no step rewards: all at the end
    torch.testing.assert_close(outcome.advantages[:, 0], sums)


def test_grpo_with_process_rewards_trains_and_needs_a_step_reward(tiny):
    policy, tok = tiny
    cfg = CriticFreeConfig(advantage="process", batch_size=2, num_generations=4, max_new_tokens=24, lr=1e-3,
                           kl_coef=0.0, eval_every=0, progress=False, seed=0)
    with pytest.raises(ValueError, match="advantage='process' needs a process reward"):
        CriticFreeTrainer(policy, copy.deepcopy(policy), tok, A.strict_reward, cfg)
    model = copy.deepcopy(policy)  # the tiny policy rarely writes a right step: a reward it does earn, per line
    lines = StepReward(lambda p, r, t: [(i + len(x), float(len(x) % 3)) for i, x in _line_spans(r)], name="lines")
    trainer = CriticFreeTrainer(model, copy.deepcopy(policy), tok, lines, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train(A.prompts("train", 8), 2)
    exp = trainer.experience
    assert trainer.name == "GRPO (process rewards)"
    assert exp.advantages.shape == exp.mask.shape and bool(torch.isfinite(exp.advantages).all())
    assert exp.advantages.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        CriticFreeConfig(advantage="process", num_generations=1)
    with pytest.raises(ValueError, match="advantage='process' takes the KL in the loss"):
        CriticFreeConfig(advantage="process", kl_penalty="reward", kl_coef=0.05)


def test_the_process_estimator_without_step_rewards_is_named(tiny):
    from rlhf_book.experience import AdvantageInputs, get_advantage_estimator

    est = get_advantage_estimator("grpo_process")
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs step rewards"):
        est(AdvantageInputs(z, z, torch.ones(2, 3), torch.zeros(2), group_size=2))
    s = StepRewards(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[0, 1, 0], [0, 0, 1]]).bool())
    adv, ret = est(AdvantageInputs(z, z, torch.ones(2, 3), torch.zeros(2), group_size=2, step_rewards=s))
    assert adv[0, 0] > 0 > adv[1, 0] and ret[0].tolist() == [1.0, 1.0, 0.0]


def test_ppo_places_a_step_reward_where_each_step_ends(tiny):
    from rlhf_book.ppo import PPOConfig, PPOTrainer

    policy, tok = tiny
    lines = StepReward(lambda p, r, t: [(i + len(x), 1.0) for i, x in _line_spans(r)], name="one_per_line")
    cfg = PPOConfig(batch_size=4, max_new_tokens=24, kl_coef=0.0, eval_every=0, progress=False, seed=0,
                    missing_eos_score=None)
    trainer = PPOTrainer(copy.deepcopy(policy), copy.deepcopy(policy), tok, lines, cfg)
    trainer.train(A.prompts("train", 8), 1)
    exp = trainer.experience
    n_lines = torch.tensor([len(r.split("\n")) for r in exp.rollout.responses], dtype=torch.float32)
    torch.testing.assert_close((exp.rewards * exp.mask).sum(1), n_lines)  # one reward of 1 per line...
    torch.testing.assert_close(((exp.rewards != 0) & exp.mask.bool()).sum(1).float(), n_lines)  # ...each on its token

