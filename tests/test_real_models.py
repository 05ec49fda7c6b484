"""Every trainer on the architectures people fine-tune (issue 25): bf16 checkpoints, LoRA, gradient checkpointing.

Tiny random-weight Llama / Qwen3 / GPT-NeoX checkpoints saved in bf16 (``rlhf_book.testing``),
full-weight and LoRA (``peft``, skipped when it is not installed), each trainer for 2 iterations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rlhf_book
from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.adapters import AdapterDisabledReference, hf_model, is_peft_model, merged_copy, trunk
from rlhf_book.critic import PolicyWithValueHead, ValueHead, ValueModel
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
from rlhf_book.dpo import DPOConfig, DPOTrainer
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.rollout import cache_kwarg, generate, logits_to_keep_kwargs, response_logprobs
from rlhf_book.runtime import dtype_kwargs, hold_trainable, mixed_numerics, resolve_dtype
from rlhf_book.testing import save_tiny_model
from rlhf_book.trainer import disable_dropout

ARCHS = ("llama", "qwen3", "gpt_neox")
PROMPTS = ["Weather in Oslo?", "Weather in Rome?", "Is it cold today?", "How was the film?",
           "Weather tomorrow?", "Was the hotel nice?"]
PAIRS = [{"prompt": p, "chosen": "Sunny and warm.", "rejected": "Cold and rainy."} for p in PROMPTS[:4]] * 2
COMMON = dict(max_new_tokens=8, progress=False, eval_every=0, gradient_checkpointing=True, lr=1e-3)


def vowel_reward(prompts, responses, terminated):
    """A text reward with many distinct values: vowels plus a tenth of the length."""
    return torch.tensor([sum(r.count(v) for v in "aeiou") + 0.1 * len(r) for r in responses], dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_models")
    return {arch: save_tiny_model(root / arch, arch, dtype=torch.bfloat16, attention_dropout=0.1) for arch in ARCHS}


def _load(path, dtype="auto"):
    return rlhf_book.load_base_model(str(path), device="cpu", progress=False, dtype=dtype)


def _lora(lm):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(lm, cfg)


def _policy(path, lora: bool, dtype="auto"):
    lm, tok = _load(path, dtype)
    if lora:
        return _lora(lm), None, tok  # ref_model=None: the policy with its adapters disabled
    return lm, copy.deepcopy(lm), tok


class CheckpointCounter:
    """Counts forwards of the decoder layers' sub-modules inside a backward pass (recomputation: checkpointing at work).

    The sub-modules, because transformers checkpoints a layer's ``forward`` (its own hooks do not run again)."""

    def __init__(self, trainer, *modules):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.in_backward, self.count = False, 0
        for m in modules:
            for layer in m.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    for child in layer.children():
                        child.register_forward_hook(self._hook)
        backward = trainer.accelerator.backward

        def counted(*a, **k):
            self.in_backward = True
            try:
                return backward(*a, **k)
            finally:
                self.in_backward = False

        trainer.accelerator.backward = counted

    def _hook(self, *args):
        self.count += self.in_backward


def _base_weights(lm):
    return {k: v.detach().clone() for k, v in lm.named_parameters() if "lora_" not in k}


def _check_lora(trainer, base_before, ro, initial_logprobs):
    lm = trainer.lm
    assert isinstance(trainer.ref, AdapterDisabledReference) and trainer.ref.policy is lm
    after = _base_weights(lm)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in after), "LoRA training changed a base weight"
    lora = [p for n, p in lm.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad and p.dtype == torch.float32 for p in lora), "the ref froze the adapters"
    with torch.no_grad():  # the adapter-off reference is the initial policy, bit for bit
        assert torch.equal(response_logprobs(trainer.ref, ro), initial_logprobs)


def _check_export(trainer, tmp_path):
    from transformers import AutoModelForCausalLM

    out = trainer.export(tmp_path / "export", save_adapter=is_peft_model(trainer.lm))
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.get_input_embeddings().num_embeddings == len(trainer.tokenizer)  # the added PAD row
    ids = trainer.tokenizer(["Weather in Oslo? Sunny."], return_tensors="pt")["input_ids"]
    trainer.lm.eval()
    with torch.no_grad():
        live, loaded = trainer.lm(input_ids=ids).logits.float(), plain(input_ids=ids).logits.float()
    # full weights: the same fp32 tensors; LoRA: merged into bf16 base weights (one rounding of W + BA)
    tol = 0 if not is_peft_model(trainer.lm) else 0.1
    assert (live - loaded).abs().max().item() <= tol
    if is_peft_model(trainer.lm):
        assert (out / "adapter" / "adapter_config.json").exists()
        assert any("lora_" in n for n, _ in trainer.lm.named_parameters()), "export merged the live policy"


ON_POLICY = {
    "ppo_head": lambda: (PPOTrainer, PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, critic="head", **COMMON)),
    "ppo_separate": lambda: (PPOTrainer, PPOConfig(batch_size=4, minibatch_size=2, ppo_epochs=1, critic="separate",
                                                   **COMMON)),
    "a2c": lambda: (A2CTrainer, A2CConfig(batch_size=4, **COMMON)),
    "rloo": lambda: (CriticFreeTrainer, CriticFreeConfig(advantage="rloo", batch_size=2, num_generations=2, **COMMON)),
    "grpo": lambda: (CriticFreeTrainer, CriticFreeConfig(advantage="grpo", batch_size=2, num_generations=2, **COMMON)),
}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("algo", list(ON_POLICY))
def test_on_policy_trainers_run_from_bf16_checkpoints(checkpoints, tmp_path, arch, lora, algo):
    cls, cfg = ON_POLICY[algo]()
    policy, ref, tok = _policy(checkpoints[arch], lora)
    assert hf_model(policy).dtype == torch.bfloat16  # "auto": the checkpoint's dtype
    base_before = _base_weights(policy) if lora else None
    trainer = cls(policy, ref, tok, vowel_reward, config=cfg)
    lm = trainer.lm
    # the dtype rule: trainable parameters in fp32, frozen ones as loaded
    assert all(p.dtype == torch.float32 for p in trainer.optimizer.param_groups[0]["params"])
    if lora:
        assert any(p.dtype == torch.bfloat16 for p in lm.parameters())
    assert mixed_numerics(lm, trainer.precision) == lora
    fixed = trainer.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        initial = response_logprobs(lm, fixed)
    counter = CheckpointCounter(trainer, trainer.model, *([trainer.critic] if trainer.critic is not None else []))
    teacher, update = [], trainer.update

    def update_after_teacher_forcing(exp):  # log pi of the sampled tokens by the policy that sampled them
        with torch.no_grad():
            teacher.append(response_logprobs(lm, exp.rollout))
        return update(exp)

    trainer.update = update_after_teacher_forcing
    rewards = []
    for it in range(2):
        stats = trainer.step(PROMPTS[2 * it: 2 * it + cfg.batch_size])
        rewards.append(stats["proxy_reward"])
        finite = [v for k, v in stats.items() if isinstance(v, float) and k.endswith(("loss", "grad_norm", "kl"))]
        assert finite and all(torch.isfinite(torch.tensor(finite))), stats
        exp, tf = trainer.experience, teacher[-1]
        if it == 0 and not lora:  # fp32 policy: log pi_old is the sampler's own (not recomputed), and matches
            assert torch.equal(exp.old_logprobs, exp.rollout.logprobs)
            assert torch.allclose(exp.old_logprobs, tf, atol=1e-5)
        if it == 0 and lora:  # bf16 base weights: log pi_old recomputed by teacher forcing
            assert not torch.equal(exp.old_logprobs, exp.rollout.logprobs)
            assert torch.allclose(exp.old_logprobs, tf, atol=1e-6)
    assert rewards[0] != rewards[1]  # the reward statistic moves (random models: not necessarily up)
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    assert counter.count > 0, "gradient checkpointing did not recompute any layer"
    if trainer.critic is not None:
        assert all(torch.isfinite(p).all() for p in trainer.critic.parameters())
    if lora:
        _check_lora(trainer, base_before, fixed, initial)
        if algo == "a2c":  # the separate critic trains its own adapter copy on frozen base weights
            crit = dict(trainer.critic.named_parameters())
            assert any("lora_" in n for n in crit) and not any(p.requires_grad for n, p in crit.items()
                                                               if "lora_" not in n and "value_head" not in n)
    if algo in ("ppo_head", "grpo"):
        _check_export(trainer, tmp_path)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_runs_from_bf16_checkpoints(checkpoints, tmp_path, arch, lora):
    policy, ref, tok = _policy(checkpoints[arch], lora)
    base_before = _base_weights(policy) if lora else None
    trainer = DPOTrainer(policy, ref, tok, DPOConfig(batch_size=4, **COMMON))
    fixed = trainer.sample(PROMPTS[:2], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        initial = response_logprobs(trainer.lm, fixed)
    counter = CheckpointCounter(trainer, trainer.lm)
    history = trainer.train(PAIRS, epochs=1.0)
    rows = [h for h in history if h["step"] > 0]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    # step 1, policy == reference up to bf16 rounding (other batch shapes; a full-weight policy is held in fp32 while
    # its reference stays a bf16 copy); the exact check in fp32 is test_dpo_first_step_is_exact_with_attention_dropout
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-2)
    assert rows[0]["loss"] != rows[1]["loss"]
    assert counter.count > 0
    if lora:
        _check_lora(trainer, base_before, fixed, initial)
    _check_export(trainer, tmp_path)


def test_lora_export_equals_live_policy_in_fp32(checkpoints, tmp_path):
    """From an fp32 load the merged export reloads in plain transformers with the live policy's logits."""
    policy, _, tok = _policy(checkpoints["llama"], lora=True, dtype="float32")
    trainer = CriticFreeTrainer(policy, None, tok, vowel_reward,
                                CriticFreeConfig(batch_size=2, num_generations=2, **COMMON))
    trainer.step(PROMPTS[:2])
    assert not mixed_numerics(trainer.lm, trainer.precision)
    assert torch.equal(trainer.experience.old_logprobs, trainer.experience.rollout.logprobs)  # fp32: not recomputed
    from transformers import AutoModelForCausalLM

    out = trainer.export(tmp_path / "fp32")
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = tok(["Weather in Oslo? Sunny."], return_tensors="pt")["input_ids"]
    trainer.lm.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.lm(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
    assert not (out / "adapter").exists()


def test_pure_bf16_training_keeps_the_dtype(checkpoints):
    policy, ref, tok = _policy(checkpoints["llama"], lora=False)
    cfg = PPOConfig(batch_size=4, minibatch_size=4, ppo_epochs=1, trainable_dtype="keep", critic="head", **COMMON)
    trainer = PPOTrainer(policy, ref, tok, vowel_reward, config=cfg)
    assert trainer.model.value_head.linear.weight.dtype == torch.bfloat16  # follows the trunk
    stats = trainer.step(PROMPTS[:4])
    assert all(p.dtype == torch.bfloat16 for p in trainer.lm.parameters())
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_value_heads_on_bf16_trunks(checkpoints):
    lm, _ = _load(checkpoints["qwen3"])
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    head = PolicyWithValueHead(lm)
    assert head.value_head.linear.weight.dtype == torch.bfloat16
    assert head.value(ids, mask).shape == (1, 4)
    assert PolicyWithValueHead(lm, dtype="float32").value(ids, mask).dtype == torch.float32
    critic = ValueModel.from_causal_lm(lm)
    assert critic.value(ids, mask).shape == (1, 4)
    assert ValueModel.from_causal_lm(lm, dtype="fp32").value(ids, mask).dtype == torch.float32
    assert ValueHead(64)(torch.randn(1, 2, 64, dtype=torch.bfloat16)).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        ValueModel.from_causal_lm(lm, dtype="int8")


def test_dtype_argument(checkpoints, monkeypatch):
    lm, _ = _load(checkpoints["llama"], dtype="float32")
    assert lm.dtype == torch.float32
    lm, _ = _load(checkpoints["llama"], dtype=torch.bfloat16)
    assert lm.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        _load(checkpoints["llama"], dtype="int8")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.53.0")
    assert dtype_kwargs("float16") == {"torch_dtype": torch.float16}
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert dtype_kwargs("auto") == {"dtype": "auto"}


def test_hold_trainable_casts_only_trainable_parameters():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    m[0].requires_grad_(False)
    assert hold_trainable(m) == 2
    assert m[0].weight.dtype == torch.bfloat16 and m[1].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="trainable_dtype"):
        hold_trainable(m, "half")


def test_ref_model_none_needs_a_peft_policy(checkpoints):
    lm, tok = _load(checkpoints["llama"])
    with pytest.raises(ValueError, match="ref_model=None needs a peft.PeftModel"):
        PPOTrainer(lm, None, tok, vowel_reward, PPOConfig(batch_size=4, minibatch_size=4, progress=False))
    with pytest.raises(ValueError, match="ref_model=None"):
        DPOTrainer(lm, None, tok, DPOConfig(batch_size=4, progress=False))


def test_disable_dropout_covers_attention_dropout_floats(checkpoints):
    lm, _ = _load(checkpoints["llama"])
    attn = [m for m in lm.modules() if hasattr(m, "attention_dropout")]
    assert attn and lm.config.attention_dropout == 0.1 and all(m.attention_dropout == 0.1 for m in attn)
    disable_dropout(lm)
    assert lm.config.attention_dropout == 0.0 and all(m.attention_dropout == 0.0 for m in attn)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    lm.eval()
    with torch.no_grad():
        a = lm(input_ids=ids).logits
        lm.train()
        assert torch.equal(a, lm(input_ids=ids).logits)  # train mode computes what eval mode does


def test_dpo_first_step_is_exact_with_attention_dropout(checkpoints):
    """attention_dropout=0.1 in the config, DPO trains in train mode: disable_dropout makes step 1's margin 0."""
    lm, tok = _load(checkpoints["llama"], dtype="float32")
    trainer = DPOTrainer(lm, copy.deepcopy(lm), tok, DPOConfig(batch_size=8, ref_batch_size=8, **COMMON))
    row = trainer.train(PAIRS, epochs=1.0)[-1]
    assert row["reward_margin"] == pytest.approx(0.0, abs=1e-6) and row["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_peft_sampling_uses_the_base_models_forward_names(checkpoints):
    lm, tok = _load(checkpoints["llama"])
    policy = _lora(lm)
    assert cache_kwarg(policy) == cache_kwarg(lm)
    assert logits_to_keep_kwargs(policy, 3) == {"logits_to_keep": 3}
    assert trunk(policy) is lm.base_model
    ro = generate(policy, tok, PROMPTS[:2], 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ro.logprobs, response_logprobs(policy, ro), atol=0.1)  # bf16 weights: rounding differs


def test_adapter_disabled_reference_leaves_the_policy_alone(checkpoints):
    lm, tok = _load(checkpoints["gpt_neox"], dtype="float32")
    policy = _lora(lm)
    policy.train()
    ref = AdapterDisabledReference(policy)
    ref.to("cpu").eval().requires_grad_(False)
    disable_dropout(ref)
    assert list(ref.parameters()) == [ref._anchor] and not list(ref.children())
    assert policy.training and any(p.requires_grad for p in policy.parameters())
    assert any(m.p > 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))  # policy's dropout untouched
    with torch.no_grad():  # move the adapter: the reference stays the base model
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
        assert policy.training  # the reference's forward ran the policy in eval mode, then restored its mode
        policy.eval()
        with policy.disable_adapter():
            base = policy(input_ids=ids).logits
        assert torch.equal(ref_logits, base)
        assert not torch.equal(policy(input_ids=ids).logits, base)
        copy_logits = merged_copy(policy)(input_ids=ids).logits
        assert torch.allclose(copy_logits, policy(input_ids=ids).logits, atol=1e-5)
        assert any("lora_" in n for n, _ in policy.named_parameters())  # merged_copy left the policy as it was
    assert not policy.training  # its own mode, as set


def test_lora_reward_model_scores_critic_and_save(checkpoints, tmp_path):
    peft = pytest.importorskip("peft")
    from rlhf_book.reward_model import (load_reward_model, reward_model_from_lm, reward_scores, save_reward_model,
                                        train_reward_model)

    lm, tok = _load(checkpoints["qwen3"], dtype="float32")
    rm = peft.get_peft_model(reward_model_from_lm(lm), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                       task_type="SEQ_CLS"))
    train_reward_model(rm, tok, PAIRS, epochs=1, batch_size=4, lr=1e-2, progress=False)
    responses = ["Sunny and warm.", "Cold and rainy."]
    scores = reward_scores(rm, tok, PROMPTS[:2], responses)
    assert scores[0] != scores[1]
    critic = ValueModel.from_reward_model(rm)  # the trunk and score head are found through the PEFT wrapper
    assert critic.value(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)).shape == (1, 3)
    assert tok.padding_side == "left"
    save_reward_model(rm, tok, tmp_path / "rm")
    assert tok.padding_side == "left"  # saving (right padding) did not flip the caller's tokenizer
    loaded, ltok = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert ltok.padding_side == "right"
    assert torch.allclose(reward_scores(loaded, ltok, PROMPTS[:2], responses), scores, atol=1e-5)
