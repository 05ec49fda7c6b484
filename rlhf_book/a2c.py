"""Advantage actor-critic (A2C) for a language model: one rollout, one update of actor and critic.

One A2C iteration on a batch of prompts (what :meth:`A2CTrainer.step` does), in order:

1. **act**: the actor pi_theta samples a response to each prompt, token by token;
2. **judge**: the reward function scores each finished response, r(x, y); the frozen
   reference pi_ref gives log pi_ref(a_t | s_t) of every sampled token;
3. **per-token rewards**: r_t = -beta (log pi_theta - log pi_ref) + [t = last] r(x, y)
   (:func:`rlhf_book.rewards.per_token_rewards`);
4. **criticise**: the critic gives V(s_t) for the state before every response token;
5. **advantages**: A_t from the TD errors delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
   (GAE, :func:`rlhf_book.advantage.gae`; lam = 0 is the one-step A2C advantage), and
   the critic's targets R_t = A_t + V(s_t);
6. **update**: one gradient step on

       L = -mean_t[A_t log pi_theta(a_t | s_t)]  +  vf_coef * 0.5 mean_t[(V(s_t) - R_t)^2]  -  c_H mean_t H_t

   the first term moves the actor (raise the probability of tokens that did better
   than the critic expected), the second the critic (predict the return better).

Unlike PPO (chapter 5) each batch is used for exactly one update, so the policy that
is updated is the one that sampled: log pi at update time equals log pi at rollout
time, and no importance ratio or clipping is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .advantage import gae, masked_mean, masked_whiten
from .critic import PolicyWithValueHead, ValueModel, explained_variance, forward_logprobs_and_values, response_values
from .gold import gold_reward_fn
from .kl import kl_k1, sequence_kl
from .losses import entropy_bonus, policy_gradient_loss, value_loss
from .rewards import per_token_rewards
from .runtime import adam
from .trainer import OnPolicyTrainer, SpeedConfig, check_config, config_from_dict
from .rollout import Rollout, generate, prompt_texts, response_logprobs, score_rollout

__all__ = [
    "A2CConfig",
    "A2CTrainer",
    "train",
    "plot_history",
    "policy_gradient_variance",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "a2c_state.pt"


@dataclass
class A2CConfig(SpeedConfig):
    """Every knob of :class:`A2CTrainer`; the defaults are the measured CPU recipe of chapter 3."""

    # --- rollouts
    batch_size: int = 32  # prompts (= responses) per iteration, one update each
    max_new_tokens: int = 40  # responses without EOS by then are cut off (terminated = False)
    temperature: float = 1.0  # sampling temperature; log-probs of policy and reference use the same one
    # --- optimisation
    lr: float = 3e-4  # Adam learning rate of the actor
    critic_lr: float | None = 1e-3  # Adam learning rate of the critic (the separate ValueModel, or the value head); None: lr
    critic: str = (
        "separate"  # "separate": a ValueModel (copy of the base LM's trunk); "head": a value head on the policy
    )
    detach_value_head: bool = True  # (critic="head") the value loss cannot move the policy's trunk
    value_updates: int = 1  # critic gradient steps per iteration (0: a frozen critic, for experiments)
    vf_coef: float = 1.0  # weight of the value loss in the joint loss
    entropy_coef: float = 0.0  # entropy bonus c_H (0: off; the KL penalty anchors the policy instead)
    max_grad_norm: float | None = 1.0  # gradient-norm clip of each network (None: off)
    # --- returns and advantages
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda (0: one-step TD advantage, 1: Monte-Carlo return minus V)
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 per batch
    kl_coef: float = 0.05  # beta of the per-token KL penalty -beta (log pi - log pi_ref) in the reward
    # --- speed: precision, tf32, compile, generation_threads (inherited from SpeedConfig)
    # --- bookkeeping
    seed: int = 0  # seeds prompt order and sampling
    eval_every: int = 10  # iterations between held-out evaluations in train() (0: first and last only)
    eval_samples_per_prompt: int = 2  # responses per held-out prompt at each evaluation
    checkpoint_every: int = 10  # iterations between checkpoints in train() (when checkpoint_dir is given)
    progress: bool = True  # tqdm bar in train()

    def __post_init__(self):
        check_config(
            self,
            positive=("batch_size", "max_new_tokens", "temperature", "lr", "eval_samples_per_prompt"),
            positive_or_none=("max_grad_norm", "critic_lr"),
            nonnegative=("value_updates", "vf_coef", "entropy_coef", "kl_coef", "eval_every", "checkpoint_every"),
            unit_interval=("gamma", "lam"),
        )
        self.check_speed()
        if self.critic not in ("head", "separate"):
            raise ValueError(f"A2CConfig.critic must be 'head' or 'separate', got {self.critic!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "A2CConfig":
        """Build from a dict, naming any unknown key."""
        return config_from_dict(cls, d)


class A2CTrainer(OnPolicyTrainer):
    """A2C on a causal LM against ``reward_fn``, with a per-token KL penalty toward ``ref_model``.

    ``policy`` (the actor) is trained in place: a causal LM or a
    :class:`~rlhf_book.critic.PolicyWithValueHead` (whose value head is then the critic).
    ``critic``: a module to use as the critic (e.g. ``ValueModel.from_reward_model(rm)``);
    when None it is built from ``config.critic`` ("separate": a ValueModel copy of the
    policy's trunk, "head": a value head on the policy).
    ``reward_fn(prompts, responses, terminated) -> (B,)`` is what is optimised; ``gold_fn``
    (same signature, or None) is only logged.
    """

    name = "A2C"
    checkpoint_name = CHECKPOINT_NAME

    def __init__(
        self,
        policy: nn.Module,
        ref_model: nn.Module,
        tokenizer,
        reward_fn: Callable = gold_reward_fn,
        config: A2CConfig | None = None,
        critic: nn.Module | None = None,
        gold_fn: Callable | None = gold_reward_fn,
    ):
        self.config = cfg = config if config is not None else A2CConfig()
        lm = policy.lm if isinstance(policy, PolicyWithValueHead) else policy
        if ref_model is policy or ref_model is lm:
            raise ValueError("ref_model must be a separate frozen copy of the policy, not the policy itself")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("tokenizer needs a PAD token distinct from EOS (else EOS is masked out and never learned)")
        self.lm = lm
        if isinstance(policy, PolicyWithValueHead) and critic is None:
            self.model, self.critic = policy, None  # critic = the policy's own value head
        elif critic is None and cfg.critic == "head":
            self.model, self.critic = PolicyWithValueHead(lm, detach_value_head=cfg.detach_value_head), None
        else:
            self.model = lm
            self.critic = critic if critic is not None else ValueModel.from_causal_lm(lm)
        self.device = next(lm.parameters()).device
        self.model.to(self.device)
        if self.critic is not None:
            self.critic.to(self.device)
        self.ref = ref_model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.reward_fn, self.gold_fn = tokenizer, reward_fn, gold_fn
        self.actor_params = [p for p in lm.parameters() if p.requires_grad]
        critic_module = self.model.value_head if self.critic is None else self.critic
        self.critic_params = [p for p in critic_module.parameters() if p.requires_grad]
        self.actor_optimizer = adam(self.actor_params, lr=cfg.lr)
        self.critic_optimizer = adam(self.critic_params, lr=cfg.critic_lr if cfg.critic_lr is not None else cfg.lr)
        self.setup_speed()
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.iteration = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ pieces of one iteration
    def values(self, rollout: Rollout) -> torch.Tensor:
        """V(s_t) of every response token under the current critic, (B, R) (with grad)."""
        ids = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
        with self.autocast():
            if self.critic is None:
                return forward_logprobs_and_values(self.compiled(self.model), *ids, temperature=self.config.temperature)[1].float()
            return response_values(self.compiled(self.critic), *ids).float()

    def step(self, prompts: Sequence) -> dict:
        """One A2C iteration on ``prompts`` (strings or records); returns its statistics (floats)."""
        cfg, t0 = self.config, time.perf_counter()
        texts = prompt_texts(prompts)
        # 1. act
        with self.autocast():
            rollout = generate(self.lm, self.tokenizer, texts, cfg.max_new_tokens, cfg.temperature,
                               generator=self.generator, threads=cfg.generation_threads)
        ids = (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask)
        mask = rollout.response_mask
        # 2. judge: the reward function scores each response, the reference gives log pi_ref
        with torch.no_grad(), self.autocast():  # a reward model's forward runs in bf16 too
            scores = score_rollout(self.reward_fn, rollout, self.device)
            ref_logprobs = response_logprobs(self.compiled(self.ref), *ids, temperature=cfg.temperature)
        # 3. per-token rewards; log pi(a_t | s_t) was recorded while sampling
        rewards, kl = per_token_rewards(scores, mask, rollout.logprobs, ref_logprobs, kl_coef=cfg.kl_coef)
        # 4. criticise: V(s_t); the same forward gives the actor's log-probs (with grad) and entropy
        self.model.train()
        if self.critic is not None:
            self.critic.train()
        with self.autocast():
            logprobs, values, entropy = forward_logprobs_and_values(
                self.compiled(self.model), *ids, temperature=cfg.temperature, entropy_grad=cfg.entropy_coef > 0
            )
            if self.critic is not None:
                values = response_values(self.compiled(self.critic), *ids)
        values = values.float()
        # 5. advantages and value targets (constants)
        advantages, returns = gae(rewards, values.detach(), mask, cfg.gamma, cfg.lam)
        ev = explained_variance(values.detach(), returns, mask)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 6. one update of actor and critic
        pg = policy_gradient_loss(logprobs, advantages, mask)
        vl = value_loss(values, returns, mask)
        loss = pg + entropy_bonus(entropy, mask, cfg.entropy_coef)
        if cfg.value_updates > 0:
            loss = loss + cfg.vf_coef * vl
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        actor_norm = self._clip(self.actor_params)
        self.actor_optimizer.step()
        if cfg.value_updates > 0:
            self._clip(self.critic_params)
            self.critic_optimizer.step()
        # extra critic-only steps on the same targets (the critic's update frequency)
        for _ in range(cfg.value_updates - 1):
            self.critic_optimizer.zero_grad(set_to_none=True)
            extra = cfg.vf_coef * value_loss(self.values(rollout), returns, mask)
            extra.backward()
            self._clip(self.critic_params)
            self.critic_optimizer.step()
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.model.eval()
        if self.critic is not None:
            self.critic.eval()

        seq_kl = sequence_kl(kl, mask)
        stats = {
            "iteration": self.iteration + 1,
            "proxy_reward": scores.mean().item(),
            "kl": seq_kl.mean().item(),
            "entropy": masked_mean(entropy.detach(), mask).item(),
            "policy_loss": pg.item(),
            "value_loss": vl.item(),
            "explained_variance": ev,
            "value_mean": masked_mean(values.detach(), mask).item(),
            "return_mean": masked_mean(returns, mask).item(),
            "response_length": rollout.response_lengths.float().mean().item(),
            "terminated": rollout.terminated.float().mean().item(),
            "grad_norm": actor_norm,
        }
        if self.gold_fn is not None:
            gold = scores if self.gold_fn is self.reward_fn else score_rollout(self.gold_fn, rollout, self.device)
            stats["gold_reward"] = gold.mean().item()
        stats["step_seconds"] = time.perf_counter() - t0
        self.iteration += 1
        self.last_rollout = rollout
        return stats

    def _clip(self, params: list[torch.Tensor]) -> float:
        if self.config.max_grad_norm is None:
            return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))
        return float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, prompts: Sequence, seed: int | None = None) -> dict:
        """Held-out proxy and gold reward, KL (k1, per sequence), length; sampled with a fixed seed.

        Each prompt is answered ``config.eval_samples_per_prompt`` times. The generator is
        its own (seed ``config.seed + 1`` unless given): evaluating never changes the
        training run, and every evaluation uses the same random numbers.
        """
        cfg = self.config
        texts = [p for p in prompt_texts(prompts) for _ in range(cfg.eval_samples_per_prompt)]
        ro, ref_lp = self.eval_rollout(texts, seed)
        with self.autocast():
            proxy = score_rollout(self.reward_fn, ro, self.device)
        kl = sequence_kl(kl_k1(ro.logprobs, ref_lp), ro.response_mask)
        out = {
            "eval_proxy_reward": proxy.mean().item(),
            "eval_kl": kl.mean().item(),
            "eval_response_length": ro.response_lengths.float().mean().item(),
        }
        if self.gold_fn is not None:
            out["eval_gold_reward"] = score_rollout(self.gold_fn, ro, self.device).mean().item()
        out["eval_samples"] = [
            {"prompt": p, "response": r}
            for p, r in list(zip(ro.prompts, ro.responses))[:: cfg.eval_samples_per_prompt][:3]
        ]
        return out

    # ------------------------------------------------------------------ checkpoints
    def stateful(self) -> dict:
        return {"actor_optimizer": self.actor_optimizer, "critic_optimizer": self.critic_optimizer}

    def progress_postfix(self, stats: dict) -> dict:
        return {"reward": f"{stats['proxy_reward']:.2f}", "kl": f"{stats['kl']:.2f}", "ev": f"{stats['explained_variance']:.2f}"}


def train(
    config: A2CConfig | None = None,
    iterations: int = 60,
    model: str = "cpu",
    reward_fn: Callable = gold_reward_fn,
    gold_fn: Callable | None = gold_reward_fn,
    checkpoint_dir: str | Path | None = None,
    split_seed: int = 0,
) -> tuple[A2CTrainer, list[dict]]:
    """Train A2C from the base LM ``model`` on the world's training prompts, evaluating on the held-out ones.

    Returns ``(trainer, history)``: the trainer holds the trained policy (``trainer.lm``)
    and its critic; the history is one dict per iteration (see :meth:`A2CTrainer.train`).
    """
    from .base_model import load_base_model
    from .corpus import prompt_split

    config = config if config is not None else A2CConfig()
    policy, tokenizer = load_base_model(model, progress=config.progress)
    ref, _ = load_base_model(model, progress=False)
    trainer = A2CTrainer(policy, ref, tokenizer, reward_fn, config, gold_fn=gold_fn)
    train_prompts, eval_prompts = prompt_split(seed=split_seed)
    history = trainer.train(train_prompts, iterations, checkpoint_dir=checkpoint_dir, eval_prompts=eval_prompts)
    return trainer, history


# ---------------------------------------------------------------------- analysis helpers
def plot_history(
    runs: dict[str, list[dict]] | list[dict],
    keys: Sequence[tuple[str, str]] = (
        ("eval_gold_reward", "gold reward (held-out)"),
        ("kl", "KL to reference (nats)"),
        ("entropy", "entropy (nats / token)"),
        ("explained_variance", "explained variance"),
    ),
    title: str | None = None,
):
    """:func:`rlhf_book.plotting.plot_runs` for A2C histories (one run or ``{label: history}``); returns the figure."""
    from .plotting import plot_runs

    return plot_runs(runs if isinstance(runs, dict) else {"A2C": runs}, keys=keys, title=title, xlabel="A2C iteration")


def policy_gradient_variance(
    model: nn.Module, rollout: Rollout, weights: torch.Tensor, temperature: float = 1.0
) -> dict:
    """Spread of the one-sample policy-gradient estimates g_i = sum_t w_it grad log pi(a_it | s_it).

    ``weights`` (B,) (one number per response, e.g. its reward) or (B, R) (per token, e.g.
    advantages). Returns the mean gradient's norm, the total variance
    E||g_i - mean g||^2 (trace of the covariance) and the mean squared norm E||g_i||^2,
    over the B responses of ``rollout``: the variance a batch of size N divides by N.
    """
    mask = rollout.response_mask
    if weights.dim() == 1 and weights.size(0) == mask.size(0):
        weights = weights[:, None].expand_as(mask)
    if weights.shape != mask.shape:
        raise ValueError(f"weights must be (B,) or (B, R) = {tuple(mask.shape)}, got {tuple(weights.shape)}")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(rollout)):
        sl = slice(i, i + 1)
        lp = response_logprobs(
            model, rollout.prompt_ids[sl], rollout.prompt_mask[sl], rollout.response_ids[sl], mask[sl], temperature
        )
        obj = torch.where(mask[sl].bool(), weights[sl].detach() * lp, 0.0).sum()
        g = torch.autograd.grad(obj, params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(g, params)]))
    G = torch.stack(grads)
    mean = G.mean(0)
    return {
        "mean_grad_norm": float(mean.norm()),
        "total_variance": float(((G - mean) ** 2).sum(1).mean()),
        "mean_sq_norm": float((G**2).sum(1).mean()),
    }
