"""The speed switches (benchmarks/README.md): each one must leave the maths unchanged.

Fewer threads while sampling, no wasted forward passes, a fixed number of host reads
per iteration, bf16 autocast and torch.compile, fused Adam.
"""

import copy
import os
import shutil
import sys

import pytest
import torch

import rlhf_book
from rlhf_book import runtime
from rlhf_book.corpus import prompt_split
from rlhf_book.critic import ValueModel
from rlhf_book.gold import gold_reward_fn
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.rollout import generate, prompt_texts, response_logprobs

TRAIN, _ = prompt_split(0)
PROMPTS = prompt_texts(TRAIN[:8])


def _trainer(world, separate_critic=False, **overrides):
    model, tok = world
    kw = dict(batch_size=8, minibatch_size=4, max_new_tokens=12, progress=False, critic="head")  # else a critic module
    kw.update(overrides)
    policy = copy.deepcopy(model)
    critic = ValueModel.from_causal_lm(policy) if separate_critic else None
    return PPOTrainer(policy, copy.deepcopy(model), tok, gold_reward_fn, PPOConfig(**kw), critic=critic)


# ------------------------------------------------------------------ runtime helpers
def test_resolve_precision_and_config_validation():
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    assert runtime.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        runtime.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="PPOConfig.precision"):
        PPOConfig(precision="half")
    with pytest.raises(ValueError, match="generation_threads"):
        PPOConfig(generation_threads=0)
    assert not runtime.enable_tf32("cpu")  # a CPU has no TF32: nothing is switched


def test_intra_op_threads_restores_the_setting_even_on_error():
    before = torch.get_num_threads()
    with runtime.intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(KeyError):
        with runtime.intra_op_threads(1):
            raise KeyError("boom")
    assert torch.get_num_threads() == before


def test_fused_adam_takes_the_same_steps_as_plain_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(300))
    b = torch.nn.Parameter(a.detach().clone())
    fused, plain = runtime.adam([a], lr=1e-2, eps=1e-5), torch.optim.Adam([b], lr=1e-2, eps=1e-5)
    assert fused.defaults["fused"] is True
    for _ in range(20):
        g = torch.randn(300)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert isinstance(runtime.adam([a], lr=1e-3, weight_decay=0.1), torch.optim.AdamW)


# ------------------------------------------------------------------ generation
def test_generation_threads_give_the_same_rollout(tiny_world):
    model, tok = tiny_world
    before = torch.get_num_threads()
    a = generate(model, tok, PROMPTS, 12, generator=torch.Generator().manual_seed(0))
    b = generate(model, tok, PROMPTS, 12, generator=torch.Generator().manual_seed(0), threads=1)
    assert torch.get_num_threads() == before
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


class _CountCalls:
    """Forward pre-hook counting calls, split into one-token (decode) and longer (teacher-forced) inputs."""

    def __init__(self, module):
        self.decode = self.full = 0
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.size(1) == 1:
            self.decode += 1
        else:
            self.full += 1


def test_sampling_n_tokens_runs_the_model_n_times(tiny_world):
    model, tok = tiny_world
    calls = _CountCalls(model)
    try:
        ro = generate(model, tok, PROMPTS, 5, generator=torch.Generator().manual_seed(0))
    finally:
        calls.handle.remove()
    assert ro.response_ids.size(1) == 5  # some response was still going at token 5
    # one prompt forward gives token 1; tokens 2..5 need one step each; nothing after the last token
    assert (calls.full, calls.decode) == (1, 4)


# ------------------------------------------------------------------ PPO: no needless re-forwards
@pytest.mark.parametrize("separate_critic", [False, True])
def test_ppo_forwards_each_minibatch_once(tiny_world, separate_critic):
    """The experience step forwards the critic once (V_old) and the policy not at all (log pi_old is the sampler's)."""
    for epochs, mb in ((1, 8), (2, 4)):
        tr = _trainer(tiny_world, separate_critic, ppo_epochs=epochs, minibatch_size=mb)
        lm_calls = _CountCalls(tr.lm)
        critic_calls = _CountCalls(tr.critic) if separate_critic else None
        updates = tr.step(PROMPTS)["updates"]
        assert updates == epochs * (8 // mb)
        if separate_critic:  # the sampling prefill + one forward per update; the critic: V_old + one per update
            assert (lm_calls.full, critic_calls.full) == (1 + updates, 1 + updates)
        else:  # the sampling prefill + V_old (value head on the policy) + one forward per update
            assert lm_calls.full == 1 + 1 + updates


def _first_caller_outside_torch() -> str:
    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def test_update_loop_reads_the_device_a_fixed_number_of_times(tiny_world, monkeypatch):
    """A host read (.item(), float(), bool(), .tolist()) stalls a GPU: a minibatch step has one, the check that its
    gradient is finite (skip_nonfinite_step needs the answer before it steps, as torch's GradScaler does).

    Only reads made by rlhf_book's own code count: transformers itself reads the padding
    mask once per forward (``masking_utils._ignore_causal_mask_sdpa``), for every caller alike.
    """
    package = os.path.dirname(rlhf_book.__file__)
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if _first_caller_outside_torch().startswith(package):
                counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(**cfg):
        tr = _trainer(tiny_world, **cfg)
        counts["n"] = 0
        stats = tr.step(PROMPTS)
        return counts["n"], stats["updates"]

    n2, u2 = reads(ppo_epochs=2, minibatch_size=8)
    n8, u8 = reads(ppo_epochs=2, minibatch_size=2)
    assert (u2, u8) == (2, 8)
    # same rollout, 4x the updates: one read more per optimizer step (the finite-gradient check), nothing else
    assert 0 < n2 and n8 - n2 == u8 - u2


# ------------------------------------------------------------------ precision and compile
def test_bf16_autocast_runs_the_matmuls_in_bf16_and_keeps_the_first_ratio_at_one(tiny_world):
    tr = _trainer(tiny_world, precision="bf16")
    assert tr.precision == "bf16"
    seen = []
    hook = tr.lm.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        stats = tr.step(PROMPTS)
    finally:
        hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    # log pi_old is recomputed by a bf16 teacher-forced forward, so the first minibatch's ratio is 1 up to bf16 rounding
    assert stats["first_ratio_mean"] == pytest.approx(1.0, abs=2e-2) and stats["first_approx_kl"] < 1e-3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in stats.items() if isinstance(v, float) and k != "grad_norm")
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # weights and Adam state stay fp32
    # log pi_old comes from a bf16 teacher-forced forward, not from sampling (on a GPU the two round differently)
    ro = generate(tr.lm, tr.tokenizer, PROMPTS, 8, generator=torch.Generator().manual_seed(2))
    ro.logprobs = torch.zeros_like(ro.logprobs)  # what sampling recorded no longer matters
    old = tr.make_experience(ro).old_logprobs
    with torch.no_grad(), tr.autocast():
        torch.testing.assert_close(old, response_logprobs(tr.lm, ro))


def test_fp32_on_cpu_is_the_default(tiny_world):
    tr = _trainer(tiny_world)
    assert tr.precision == "fp32"
    seen = []
    hook = tr.lm.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        tr.step(PROMPTS)
    finally:
        hook.remove()
    assert set(seen) == {torch.float32}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_matches_eager(tiny_world):
    import warnings

    eager, compiled = _trainer(tiny_world), _trainer(tiny_world, compile=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, b = eager.step(PROMPTS), compiled.step(PROMPTS)
    assert compiled._compiled  # the teacher-forced forwards went through torch.compile
    # our helpers are not traced through their caches (Dynamo: "ignores the cache wrapper")
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    for key in ("proxy_reward", "kl", "policy_loss", "value_loss", "first_ratio_mean", "clipfrac"):
        assert b[key] == pytest.approx(a[key], abs=1e-4), key
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3)


def test_lm_head_only_on_response_columns_gives_the_same_logprobs(tiny_world):
    """``logits_to_keep``: a model without it (full logits, then sliced) and with it agree."""
    from rlhf_book.rollout import logits_to_keep_kwargs, response_logprobs

    model, tok = tiny_world

    class FullLogits(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self, lm):
            super().__init__()
            self.lm, self.config = lm, lm.config

        def forward(self, input_ids, attention_mask, position_ids):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    assert logits_to_keep_kwargs(model, 3) == {"logits_to_keep": 3}
    assert logits_to_keep_kwargs(FullLogits(model), 3) == {}
    ro = generate(model, tok, PROMPTS, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(response_logprobs(model, ro), response_logprobs(FullLogits(model), ro))
    torch.testing.assert_close(ro.logprobs, response_logprobs(FullLogits(model), ro), atol=1e-5, rtol=1e-5)


def test_entropy_is_only_differentiated_when_it_is_in_the_loss(tiny_world):
    """With entropy_coef = 0 the entropy is logged, not trained: no graph through the (b, R, V) softmax."""
    ro = generate(tiny_world[0], tiny_world[1], PROMPTS, 6, generator=torch.Generator().manual_seed(0))
    batch = ro.select(torch.arange(4))
    assert not _trainer(tiny_world).policy_forward(batch)[2].requires_grad
    assert _trainer(tiny_world, entropy_coef=0.01).policy_forward(batch)[2].requires_grad


def test_with_dropout_on_v_old_comes_from_a_dropout_free_forward(tiny_world):
    """The experience step runs in eval mode: with dropout on in the updates, V_old is still exact."""
    from rlhf_book.critic import response_values

    tr = _trainer(tiny_world, disable_dropout=False, critic_lr=1e-9, lr=1e-9)
    for m in tr.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    seen = {}
    make = tr.make_experience

    def spy(rollout, timings=None):
        seen["exp"] = make(rollout, timings)
        return seen["exp"]

    tr.make_experience = spy
    tr.step(PROMPTS)
    tr.model.eval()
    with torch.no_grad():
        expected = response_values(tr.model, seen["exp"].rollout)
    torch.testing.assert_close(seen["exp"].values, expected, atol=1e-4, rtol=1e-3)
