"""DAPO's overlong reward shaping and dynamic sampling in the critic-free trainer: by hand, on the tiny world."""

import copy
import math

import rlhf_book  # noqa: F401  (before torch)
import pytest
import torch

from rlhf_book.corpus import prompt_split
from rlhf_book.advantage import degenerate_groups, grpo_advantages
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.rewards import soft_overlong_penalty
from rlhf_book.rollout import Rollout, cat_rollouts, encode_prompts, prompt_texts

TRAIN, _ = prompt_split(0)
PROMPTS = prompt_texts(TRAIN[:16])
K = 4


def _by_hand(n: int, l_max: int, cache: int, p: float = 1.0) -> float:
    """Eq. 13 of DAPO, branch by branch (TRL's get_soft_overlong_punishment), times p."""
    if n <= l_max - cache:
        return 0.0
    if n <= l_max:
        return (l_max - cache - n) / cache * p
    return -p


# ------------------------------------------------------------------ the penalty
def test_soft_overlong_penalty_at_each_branch():
    lengths = torch.tensor([0, 6, 7, 8, 9, 10, 11, 15])
    # L_max 10, L_cache 4: free up to 6 tokens, then -1/4 a token down to -1 at 10, and -1 beyond
    expect = [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0]
    assert soft_overlong_penalty(lengths, 10, 4).tolist() == expect
    assert soft_overlong_penalty(lengths, 10, 4, penalty=2.0).tolist() == [2 * x for x in expect]
    for cache in (1, 3, 10):  # 1: only a reply of L_max tokens pays; 10 (= L_max): every token costs
        got = soft_overlong_penalty(torch.arange(13), 10, cache, 0.5).tolist()
        assert got == pytest.approx([_by_hand(n, 10, cache, 0.5) for n in range(13)]), cache
    assert soft_overlong_penalty(torch.tensor([3, 4]), 10, 10).tolist() == pytest.approx([-0.3, -0.4])
    out = soft_overlong_penalty(torch.tensor([1, 2], dtype=torch.long), 4, 2)
    assert out.dtype == torch.float32 and out.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("args, match", [
    ((torch.tensor([1]), 10, 0), r"buffer must be an integer >= 1, got 0"),
    ((torch.tensor([1]), 10, 11), r"buffer must be at most max_length \(10\), got 11"),
    ((torch.tensor([1]), 0, 1), r"max_length must be an integer >= 1"),
    ((torch.tensor([1]), 10, 2.5), r"buffer must be an integer"),
    ((torch.tensor([1]), 10, 4, 0.0), r"penalty must be a finite number > 0"),
    ((torch.tensor([1]), 10, 4, float("nan")), r"penalty must be a finite number > 0"),
    ((torch.ones(2, 2), 10, 4), r"lengths must have shape \(B,\)"),
])
def test_soft_overlong_penalty_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        soft_overlong_penalty(*args)


# ------------------------------------------------------------------ the config
def test_dapo_fields_default_to_off():
    cfg = CriticFreeConfig()
    assert (cfg.dynamic_sampling, cfg.max_sampling_rounds, cfg.overlong_buffer, cfg.overlong_penalty) == (
        False, 10, None, 1.0)
    assert CriticFreeConfig(max_new_tokens=12, overlong_buffer=12).overlong_buffer == 12  # the whole reply: allowed
    assert CriticFreeConfig(dynamic_sampling=True, advantage="rloo").dynamic_sampling


@pytest.mark.parametrize("kw, match", [
    (dict(overlong_buffer=0), r"CriticFreeConfig\.overlong_buffer must be >= 1 or None, got 0"),
    (dict(max_new_tokens=12, overlong_buffer=13),
     r"CriticFreeConfig\.overlong_buffer must be in 1\.\.max_new_tokens \(12\).*got 13"),
    (dict(overlong_buffer=4, overlong_penalty=0.0), r"CriticFreeConfig\.overlong_penalty must be > 0, got 0\.0"),
    (dict(overlong_buffer=4.0), r"CriticFreeConfig\.overlong_buffer must be an integer or None"),
    (dict(max_sampling_rounds=0), r"CriticFreeConfig\.max_sampling_rounds must be >= 1, got 0"),
    (dict(dynamic_sampling="yes"), r"CriticFreeConfig\.dynamic_sampling must be true or false"),
    (dict(dynamic_sampling=True, advantage="reinforce", num_generations=2),
     r"CriticFreeConfig\.dynamic_sampling needs advantage='grpo' or 'rloo'.*got advantage='reinforce'"),
])
def test_bad_dapo_values_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        CriticFreeConfig(**kw)


class _FakeAccelerator:
    """Looks like an Accelerator of ``world`` processes to the checks a trainer makes before any collective."""

    def __init__(self, world=2):
        self.num_processes, self.process_index, self.is_main_process = world, 0, True
        self.device, self.distributed_type = torch.device("cpu"), "MULTI_CPU"

    def prepare_model(self, m, device_placement=None):
        return m

    def prepare_optimizer(self, o, device_placement=None):
        return o


def test_dynamic_sampling_is_refused_with_several_processes(tiny_world):
    model, tok = tiny_world
    make = lambda **kw: CriticFreeTrainer(copy.deepcopy(model), copy.deepcopy(model), tok,  # noqa: E731
                                          lambda p, r, t: [0.0] * len(r), CriticFreeConfig(progress=False, **kw),
                                          accelerator=_FakeAccelerator(2))
    make()  # two processes are fine without it
    with pytest.raises(ValueError, match=r"dynamic_sampling runs in one process only, got 2 processes"):
        make(dynamic_sampling=True)


# ------------------------------------------------------------------ the trainer on the tiny world
def short_reply_reward(prompts, responses, terminated):
    """+1 for ending with EOS, -0.1 a word (groups of the tiny model rarely tie)."""
    return [float(t) - 0.1 * len(r.split()) for r, t in zip(responses, terminated)]


class Recorder:
    """A reward of 0 for the prompts in ``flat`` (their groups are degenerate), ``short_reply_reward`` for the others;
    it keeps every call's prompts, responses and scores."""

    def __init__(self, flat=lambda p: False):
        self.flat, self.calls = flat, []

    def __call__(self, prompts, responses, terminated):
        base = short_reply_reward(prompts, responses, terminated)
        scores = [0.0 if self.flat(p) else s for p, s in zip(prompts, base)]
        self.calls.append({"prompts": list(prompts), "responses": list(responses), "scores": torch.tensor(scores)})
        return scores


def _trainer(world, reward, **overrides):
    model, tok = world
    kw = dict(batch_size=4, num_generations=K, max_new_tokens=12, lr=3e-3, missing_eos_score=None, kl_coef=0.0,
              eval_every=0, checkpoint_every=2, progress=False)
    kw.update(overrides)
    return CriticFreeTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, reward, CriticFreeConfig(**kw))


def _hand_rollout(tok, lengths, width):
    """One prompt answered len(lengths) times with replies of ``lengths`` tokens (no EOS), right-padded to ``width``."""
    n = len(lengths)
    ids, mask = encode_prompts(tok, ["the film was"] * n)
    resp_mask = torch.tensor([[1] * m + [0] * (width - m) for m in lengths])
    token = tok.convert_tokens_to_ids(tok.tokenize(" good"))[0]
    resp = torch.where(resp_mask.bool(), token, tok.pad_token_id)
    return Rollout(ids, mask, resp, resp_mask, logprobs=torch.zeros(n, width),
                   terminated=torch.zeros(n, dtype=torch.bool), prompts=["the film was"] * n, responses=["good"] * n)


@pytest.mark.parametrize("scale", ["none", "group"])
def test_overlong_penalty_turns_a_tied_group_into_advantages_by_hand(tiny_world, scale):
    # replies of 2, 5, 6, 8 tokens, L_max 8, L_cache 4: penalties 0, -1/4, -1/2, -1 on a reward of 1 for all
    ro = _hand_rollout(tiny_world[1], [2, 5, 6, 8], 8)
    scores = torch.tensor([1.0, 0.75, 0.5, 0.0])
    centred = scores - 0.5625
    std = math.sqrt(float((centred ** 2).sum()) / 3)
    expect = centred if scale == "none" else centred / (std + 1e-4)
    one = lambda p, r, t: [1.0] * len(r)  # noqa: E731
    tr = _trainer(tiny_world, one, max_new_tokens=8, overlong_buffer=4, scale_rewards=scale)
    exp = tr.make_experience(ro)
    assert exp.raw_scores.tolist() == [1.0] * 4 and exp.scores.tolist() == scores.tolist()
    torch.testing.assert_close(exp.advantages, torch.where(ro.response_mask.bool(), expect[:, None], 0.0))
    assert tr.experience_stats(exp)["overlong_penalty"] == pytest.approx(-1.75 / 4)
    off = _trainer(tiny_world, one, max_new_tokens=8, scale_rewards=scale).make_experience(ro)
    assert torch.equal(off.advantages, torch.zeros_like(off.advantages))  # without it the group is tied: no signal
    # penalty 2 doubles it (and Dr. GRPO's advantages with it)
    two = _trainer(tiny_world, one, max_new_tokens=8, overlong_buffer=4, overlong_penalty=2.0, scale_rewards=scale)
    assert two.make_experience(ro).scores.tolist() == [1.0, 0.5, 0.0, -1.0]


def test_overlong_penalty_in_a_step_is_added_to_every_score(tiny_world):
    tr = _trainer(tiny_world, short_reply_reward, overlong_buffer=6)
    stats = tr.step(PROMPTS[:4])
    exp = tr.experience
    hand = torch.tensor([_by_hand(int(n), 12, 6) for n in exp.rollout.response_lengths])
    assert float(hand.min()) < 0  # some replies of the tiny model are long enough to pay
    torch.testing.assert_close(exp.scores, exp.raw_scores + hand)
    assert stats["overlong_penalty"] == pytest.approx(float(hand.mean()))
    assert stats["score"] == pytest.approx(stats["proxy_reward"] + stats["overlong_penalty"], abs=1e-6)
    expect = grpo_advantages(exp.scores.view(-1, K)).reshape(-1)
    torch.testing.assert_close(exp.advantages, torch.where(exp.mask.bool(), expect[:, None], 0.0))
    assert "overlong_penalty" not in _trainer(tiny_world, short_reply_reward).step(PROMPTS[:4])


def _groups_flat(scores):
    return degenerate_groups(scores.view(-1, K)).tolist()


def test_dynamic_sampling_trains_only_on_groups_with_a_signal(tiny_world):
    odd = lambda p: sum(map(ord, p)) % 2 == 0  # noqa: E731  (about half the prompts: their groups are degenerate)
    reward = Recorder(odd)
    tr = _trainer(tiny_world, reward, dynamic_sampling=True)
    history = tr.train(TRAIN, 3)
    assert len(reward.calls) == sum(h["sampling_rounds"] for h in history)  # scored once a round, never again
    assert any(h["sampling_rounds"] > 1 for h in history)
    calls = iter(reward.calls)
    for h in history:
        rounds = [next(calls) for _ in range(h["sampling_rounds"])]
        flat = [_groups_flat(c["scores"]) for c in rounds]
        kept = [sum(not f for f in fl) for fl in flat]
        assert sum(kept[:-1]) < 4 <= sum(kept)  # it stopped at the first round that completed the batch
        assert h["sampled_degenerate_groups"] == pytest.approx(sum(map(sum, flat)) / (4 * len(rounds)))
        assert h["dropped_groups"] == pytest.approx(1 - 1 / len(rounds))
        assert h["degenerate_groups"] == 0.0
        if len(rounds) > 1:  # the later rounds drew the next prompts of the run
            assert rounds[1]["prompts"] != rounds[0]["prompts"]
    # the last iteration's batch: the first 4 groups with a signal, in sampling order, with the scores they had
    want_prompts, want_scores = [], []
    for c in rounds:
        for g, f in enumerate(_groups_flat(c["scores"])):
            if not f and len(want_prompts) < 4:
                want_prompts.append(c["prompts"][g * K])
                want_scores.append(c["scores"][g * K: (g + 1) * K])
    exp = tr.experience
    assert len(exp) == 16 and exp.rollout.prompts[::K] == want_prompts
    assert torch.equal(exp.raw_scores, torch.cat(want_scores))
    assert not any(_groups_flat(exp.scores))


def test_dynamic_sampling_cap_fills_the_batch_with_the_first_degenerate_groups(tiny_world):
    flat = set(PROMPTS[:3])  # of the step's 4 prompts only the last can have a signal
    reward = Recorder(lambda p: p in flat)
    tr = _trainer(tiny_world, reward, dynamic_sampling=True, max_sampling_rounds=2)
    stats = tr.step(PROMPTS[:4])  # a direct step: no prompt stream, the later round samples the same prompts
    assert stats["sampling_rounds"] == 2 and len(reward.calls) == 2
    assert reward.calls[1]["prompts"] == reward.calls[0]["prompts"]
    flags = [_groups_flat(c["scores"]) for c in reward.calls]
    assert flags[0][:3] == [True] * 3 and flags[1][:3] == [True] * 3
    chosen = [(r, g) for r in range(2) for g in range(4) if not flags[r][g]][:4]
    n_kept = len(chosen)
    chosen = sorted(chosen + [(r, g) for r in range(2) for g in range(4) if flags[r][g]][: 4 - n_kept])
    exp = tr.experience
    assert exp.rollout.responses == [reward.calls[r]["responses"][g * K + k] for r, g in chosen for k in range(K)]
    assert stats["degenerate_groups"] == pytest.approx((4 - n_kept) / 4) and n_kept <= 2
    assert stats["dropped_groups"] == 0.5 and stats["sampled_degenerate_groups"] == pytest.approx(
        sum(map(sum, flags)) / 8)


def test_dynamic_sampling_cap_with_no_signal_trains_on_the_first_round_and_moves_nothing(tiny_world):
    reward = Recorder(lambda p: True)
    tr = _trainer(tiny_world, reward, dynamic_sampling=True, max_sampling_rounds=3)
    before = copy.deepcopy(tr.lm.state_dict())
    stats = tr.step(PROMPTS[:4])
    assert (stats["sampling_rounds"], stats["dropped_groups"], stats["sampled_degenerate_groups"]) == (
        3, pytest.approx(2 / 3), 1.0)
    assert stats["degenerate_groups"] == 1.0 and len(reward.calls) == 3
    assert tr.experience.rollout.responses == reward.calls[0]["responses"]  # the batch is the first round's
    assert torch.equal(tr.experience.advantages, torch.zeros_like(tr.experience.advantages))
    for n, v in tr.lm.state_dict().items():  # advantage 0, no KL: a zero gradient, Adam moves nothing
        assert torch.equal(v, before[n]), n


def test_dynamic_sampling_keeps_groups_the_overlong_penalty_splits(tiny_world):
    # a constant reward, but every token costs (L_cache = L_max): a group is degenerate only if its lengths tie
    reward = Recorder(lambda p: True)
    tr = _trainer(tiny_world, reward, dynamic_sampling=True, max_sampling_rounds=1, overlong_buffer=12)
    stats = tr.step(PROMPTS[:4])
    ties = [len(set(tr.experience.rollout.response_lengths[g * K: (g + 1) * K].tolist())) == 1 for g in range(4)]
    assert stats["sampled_degenerate_groups"] == sum(ties) / 4 < 1
    assert _groups_flat(tr.experience.scores) == ties


def _strip_times(history):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in history]


@pytest.mark.parametrize("kw, extra_rounds_after_resume", [
    (dict(dynamic_sampling=True, num_iterations=2, minibatch_size=8), True),
    (dict(dynamic_sampling=True, overlong_buffer=4, num_iterations=2, minibatch_size=8, seed=1), False),
])
def test_resume_with_dynamic_sampling_and_overlong_shaping_reproduces_the_run(tiny_world, tmp_path, kw,
                                                                              extra_rounds_after_resume):
    odd = lambda p: sum(map(ord, p)) % 2 == 0  # noqa: E731
    full_trainer = _trainer(tiny_world, Recorder(odd), **kw)
    full = full_trainer.train(TRAIN, 4)
    # extra rounds before the checkpoint move the prompt draw; after it, they must draw what the full run drew
    assert any(h["sampling_rounds"] > 1 for h in full[:2])
    assert any(h["sampling_rounds"] > 1 for h in full[2:]) == extra_rounds_after_resume
    part = _trainer(tiny_world, Recorder(odd), **kw).train(TRAIN, 2, checkpoint_dir=tmp_path)
    assert len(part) == 2 and (tmp_path / "grpo_state.pt").exists()
    resumed_trainer = _trainer(tiny_world, Recorder(odd), **kw)
    resumed = resumed_trainer.train(TRAIN, 4, checkpoint_dir=tmp_path)
    assert _strip_times(resumed) == _strip_times(full)
    for (n, a), (_, b) in zip(full_trainer.lm.state_dict().items(), resumed_trainer.lm.state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed_trainer.prompt_stream is None  # the run's stream is gone after train()


def test_cat_rollouts_pads_prompts_left_and_responses_right(tiny_world):
    tok = tiny_world[1]
    a, b = _hand_rollout(tok, [1, 2], 2), _hand_rollout(tok, [3], 3)
    short_ids, short_mask = encode_prompts(tok, ["a"])
    b = Rollout(short_ids, short_mask, b.response_ids, b.response_mask, b.logprobs, b.terminated, ["a"], b.responses)
    c = cat_rollouts([a, b], pad_id=tok.pad_token_id)
    P = a.prompt_ids.size(1)
    assert P > short_ids.size(1) and c.prompt_ids.shape == (3, P) and c.response_ids.shape == (3, 3)
    assert c.prompt_mask[2].tolist() == [0] * (P - short_ids.size(1)) + short_mask[0].tolist()  # left-padded
    assert c.response_mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # right-padded
    assert c.response_ids[0, 2] == tok.pad_token_id and c.prompts == ["the film was"] * 2 + ["a"]
    assert c.logprobs.shape == (3, 3) and c.terminated.tolist() == [False] * 3
    with pytest.raises(ValueError, match="different temperatures"):
        cat_rollouts([a, Rollout(a.prompt_ids, a.prompt_mask, a.response_ids, a.response_mask, temperature=0.5)])
