"""Bounded memory: log-probs and entropy in LM-head row chunks, the last hidden state only, forward_batch_size.

The chunked numbers must be those of the one-pass path (bit for bit forward, float rounding
for gradients), on every architecture the library supports; and one log-prob forward + backward
at a 151,936-token vocabulary must use much less memory than the whole batch's logits.
"""

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_book.critic import PolicyWithValueHead, ValueModel, forward_logprobs_and_values, response_values
from rlhf_book.experience import make_experience
from rlhf_book.losses import entropy_from_logits
from rlhf_book.rollout import (LOGPROB_CHUNK_VALUES, Rollout, in_row_batches, logprob_chunk_rows, response_logprobs,
                               teacher_forced)
from rlhf_book.testing import ARCHITECTURES, tiny_config

V = 300


def _model(arch: str, vocab: int = V, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab, **overrides)).eval()  # eval: no dropout


def _rollout(vocab: int = V, B: int = 6, P: int = 5, R: int = 7, seed: int = 1) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    prompt_mask[3, :1] = 0
    response_mask = torch.ones(B, R, dtype=torch.long)
    response_mask[1, 4:] = 0  # a short reply
    response_mask[4, 2:] = 0
    return Rollout(torch.randint(0, vocab, (B, P), generator=g), prompt_mask, torch.randint(0, vocab, (B, R), generator=g),
                   response_mask, temperature=0.7)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_chunked_logprobs_and_entropy_equal_the_full_ones(arch):
    model, ro = _model(arch), _rollout()
    out = {}
    for chunk in (None, 1, 4):  # None: automatic, one chunk at this vocabulary (the one-pass path)
        model.zero_grad()
        lp, ent, _ = teacher_forced(model, ro, 0.7, chunk, "grad")
        (lp.sum() + 0.1 * ent.sum()).backward()
        out[chunk] = lp.detach(), ent.detach(), _grads(model)
    full_lp, full_ent, full_grads = out[None]
    m = ro.response_mask.bool()
    assert (full_lp[~m] == 0).all() and (full_ent[~m] == 0).all() and (full_ent[m] > 0).all()
    # the one-pass path is what it always was: fp32 log_softmax of the logits / tau
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                   position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -8:-1].float() / 0.7
    ref = torch.log_softmax(logits, -1).gather(-1, ro.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(full_lp, torch.where(m, ref, 0.0))
    torch.testing.assert_close(full_ent, torch.where(m, entropy_from_logits(logits), 0.0))
    for chunk in (1, 4):
        lp, ent, grads = out[chunk]
        assert torch.equal(lp, full_lp) and torch.equal(ent, full_ent)  # the same operations on each row
        assert len(grads) == len(full_grads)
        for g, h in zip(grads, full_grads):
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)  # the head's gradient summed chunk by chunk


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_value_head_and_response_logprobs_chunked(arch):
    ro = _rollout()
    policy = PolicyWithValueHead(_model(arch), detach_value_head=False)
    with torch.no_grad():
        policy.value_head.linear.weight.normal_()
    res = {}
    for chunk in (None, 2):
        policy.zero_grad()
        lp, values, ent = forward_logprobs_and_values(policy, ro, 0.7, entropy_grad=False, chunk_size=chunk)
        assert not ent.requires_grad
        (lp.sum() + values.sum()).backward()
        res[chunk] = lp.detach(), values.detach(), ent, _grads(policy)
    for a, b in zip(res[None][:3], res[2][:3]):
        assert torch.equal(a, b)
    for g, h in zip(res[None][3], res[2][3]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
    lp, _, ent = forward_logprobs_and_values(policy, ro, 0.7, chunk_size=2, with_entropy=False)
    assert ent is None and torch.equal(lp.detach(), res[None][0])
    with torch.no_grad():
        assert torch.equal(response_logprobs(policy.lm, ro, 0.7, chunk_size=1), res[None][0])


def test_value_head_reads_the_last_hidden_state_without_output_hidden_states(monkeypatch):
    """value() and the policy forward keep no per-layer activations: output_hidden_states is never asked for."""
    lm = _model("llama")
    policy = PolicyWithValueHead(lm)
    with torch.no_grad():
        policy.value_head.linear.weight.normal_()
    ro = _rollout()
    expected = policy.value_head(lm(ro.input_ids, attention_mask=ro.attention_mask, output_hidden_states=True,
                                    position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).hidden_states[-1])
    forward = type(lm).forward
    asked = []

    def spy(self, *args, **kwargs):
        asked.append(kwargs.get("output_hidden_states"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(lm), "forward", spy)
    values = policy.value(ro.input_ids, ro.attention_mask)
    assert asked and not any(asked)
    torch.testing.assert_close(values, expected)


def test_logit_soft_capping_is_honoured_and_an_unreadable_head_falls_back():
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0, max_position_embeddings=64)
    torch.manual_seed(0)
    gemma, ro = AutoModelForCausalLM.from_config(cfg).eval(), _rollout()
    with torch.no_grad():
        gemma.get_output_embeddings().weight.mul_(50)  # logits well beyond the cap
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the cap is applied chunk by chunk
        with torch.no_grad():
            torch.testing.assert_close(teacher_forced(gemma, ro, 1.0, 2)[0], teacher_forced(gemma, ro, 1.0, None)[0])
    # a config that says soft-capping while the model's forward does not: the check against the model's own logits
    # of the last column sees it, and the one-pass path runs
    odd = _model("qwen3")
    odd.config.final_logit_softcapping = 1.0
    with pytest.warns(UserWarning, match="logits are not"), torch.no_grad():
        lp = teacher_forced(odd, ro, 1.0, 2)[0]
    odd.config.final_logit_softcapping = None
    with torch.no_grad():
        assert torch.equal(lp, teacher_forced(odd, ro, 1.0, None)[0])


def test_chunk_rows_and_config_validation():
    assert logprob_chunk_rows(41, 1000) >= 64  # the book's shape: the whole batch in one chunk
    assert logprob_chunk_rows(129, 151_936) == 1  # a 152k vocabulary at 128 tokens: one row a chunk
    assert logprob_chunk_rows(33, 151_936) * 33 * 151_936 <= LOGPROB_CHUNK_VALUES
    assert logprob_chunk_rows(33, 151_936, 3) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            logprob_chunk_rows(33, 100, bad)
    with pytest.raises(ValueError, match="batch_size"):
        in_row_batches(len, _rollout(), 0)
    from rlhf_book.ppo import PPOConfig

    with pytest.raises(ValueError, match="forward_batch_size"):
        PPOConfig(forward_batch_size=0)
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        PPOConfig(logprob_chunk_size=0)


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_forward_batch_size_gives_the_same_experience(critic):
    lm, ro = _model("llama"), _rollout(B=7)
    ref = copy.deepcopy(lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    value = PolicyWithValueHead(lm) if critic == "head" else ValueModel.from_causal_lm(lm)
    with torch.no_grad():
        value.value_head.linear.weight.normal_()
    reward = lambda prompts, responses, terminated: torch.arange(len(terminated), dtype=torch.float)  # noqa: E731
    ro.terminated = torch.ones(7, dtype=torch.bool)
    ro.prompts, ro.responses = [""] * 7, [""] * 7
    kw = dict(kl_coef=0.1, policy=lm, whiten_advantages=True)
    one = make_experience(ro, reward, ref, value, **kw)
    for fbs, chunk in ((2, None), (3, 1), (7, 2)):
        exp = make_experience(ro, reward, ref, value, forward_batch_size=fbs, logprob_chunk_size=chunk, **kw)
        for name in ("old_logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
            torch.testing.assert_close(getattr(exp, name), getattr(one, name), rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(in_row_batches(lambda r: response_values(value, r), ro, 3), response_values(value, ro))


def test_forward_batch_size_caps_a_reward_models_batches():
    from rlhf_book.experience import _capped_batch
    from rlhf_book.reward_model import ModelReward

    rm = ModelReward(None, None, batch_size=128)
    assert _capped_batch(rm, 16).batch_size == 16 and rm.batch_size == 128  # a copy; the caller's is untouched
    assert _capped_batch(rm, None) is rm and _capped_batch(rm, 512) is rm
    fn = lambda p, r, t: torch.zeros(len(p))  # noqa: E731
    assert _capped_batch(fn, 4) is fn


def test_trainer_with_chunks_and_forward_batches_matches(tiny_world):
    """One PPO iteration of the book's model: chunked log-probs and 2-row experience forwards change no number
    beyond float rounding (and the automatic default is the one-pass path at the book's vocabulary)."""
    from rlhf_book.corpus import prompt_split
    from rlhf_book.gold import gold_reward_fn
    from rlhf_book.ppo import PPOConfig, PPOTrainer
    from rlhf_book.rollout import prompt_texts

    model, tok = tiny_world
    assert logprob_chunk_rows(40 + 1, model.config.vocab_size) >= 32
    prompts = prompt_texts(prompt_split(0)[0][:8])

    def run(**kw):
        cfg = PPOConfig(batch_size=8, minibatch_size=4, max_new_tokens=12, progress=False, entropy_coef=0.01,
                        recompute_old_logprobs=True, **kw)
        tr = PPOTrainer(copy.deepcopy(model), copy.deepcopy(model), tok, gold_reward_fn, cfg)
        return tr.step(prompts), tr

    (a, ta), (b, tb) = run(), run(logprob_chunk_size=3, forward_batch_size=2)
    for k in ("kl", "policy_loss", "value_loss", "entropy", "proxy_reward"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for p, q in zip(ta.model.parameters(), tb.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ peak memory at a real vocabulary
_WORKER = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from rlhf_book.testing import tiny_config
    from rlhf_book.rollout import Rollout, teacher_forced
    torch.set_num_threads(1)
    V, B, P, R, chunk = 151_936, 8, 8, 32, int(sys.argv[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3", V, hidden=64, layers=2))
    ro = Rollout(torch.randint(0, V, (B, P)), torch.ones(B, P, dtype=torch.long), torch.randint(0, V, (B, R)),
                 torch.ones(B, R, dtype=torch.long))
    def kib(field):  # VmRSS (now) or VmHWM (the peak since the last reset), KiB
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    try:  # reset the peak to the current RSS, so that building the model does not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = kib("VmRSS")
    except OSError:  # no reset: the peak so far is the baseline (it may hide part of the forward's peak)
        base = kib("VmHWM")
    lp, ent, _ = teacher_forced(model, ro, 1.0, chunk, "no_grad")  # what an update does at entropy_coef = 0
    lp.sum().backward()
    print(kib("VmHWM") - base)
""")


def _extra_peak_kib(chunk: int) -> int:
    # a fixed mmap threshold: every large tensor is its own mapping, returned on free, so the peak RSS is the peak
    # of live tensors rather than of the heap's fragmentation
    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "HF_HUB_OFFLINE", "OMP_WAIT_POLICY")
    env = {k: os.environ[k] for k in keep if k in os.environ}  # nothing another test may have set leaks in
    env.update(MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _WORKER, str(chunk)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc settings")
def test_chunked_logprobs_bound_the_peak_memory_at_a_152k_vocabulary():
    """8 rows x 32 tokens x 151,936: the whole batch's fp32 logits are 160 MB, and the one-pass forward + backward
    holds several such tensors (logits, log_softmax, entropy, their gradients); 2 rows at a time hold a quarter."""
    full, chunked = _extra_peak_kib(8), _extra_peak_kib(2)
    print(f"extra peak RSS: one pass {full / 1024:.0f} MiB, chunks of 2 rows {chunked / 1024:.0f} MiB")
    assert full > 4 * 160_000  # KiB: the bound below is one the full-vocabulary path exceeds
    assert chunked < full / 2


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_chunked_logprobs_of_a_peft_policy_and_its_adapter_disabled_reference(targets):
    peft = pytest.importorskip("peft")
    from rlhf_book.adapters import AdapterDisabledReference

    policy = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # adapters that do something (B = 0 at the start)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ro = _rollout()
    full = teacher_forced(policy, ro, 0.7, None, "grad")[0]
    full.sum().backward()
    full_grads = _grads(policy)
    policy.zero_grad()
    chunked = teacher_forced(policy, ro, 0.7, 2, "grad")[0]
    chunked.sum().backward()
    assert torch.equal(chunked.detach(), full.detach())
    for g, h in zip(_grads(policy), full_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
    ref = AdapterDisabledReference(policy)
    with torch.no_grad():
        ref_full = teacher_forced(ref, ro, 0.7, None)[0]
        assert not torch.equal(ref_full, full.detach())  # the adapters do change the policy
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(teacher_forced(ref, ro, 0.7, 2)[0], ref_full)
    # a LoRA'd LM head is the model's own only inside disable_adapter(): the check sees it and one pass runs
    assert any("logits are not" in str(w.message) for w in caught) == ("lm_head" in targets)
