"""rlhf_book: the library behind the RLHF notebook textbook.

Import it *before* torch in a notebook: it sets ``OMP_WAIT_POLICY=PASSIVE`` so that
torch's OpenMP threads sleep instead of spin-waiting on a busy machine (see
benchmarks/README.md for what that is worth).

The names below are the stable public API; every module (``rlhf_book.advantage``,
``rlhf_book.ppo``, ...) has more for readers who want the parts.
"""

import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ruff: noqa: E402, I001  (the environment must be set before torch is imported)
from .cache import resolve_cache_env as _resolve_cache_env

_resolve_cache_env()  # a relative $RLHF_BOOK_CACHE means the same folder in every kernel this process starts
# the world
from .runtime import configure_threads, get_device, set_seed
from .corpus import generate_examples, prompt_split, sample_prompts
from .gold import Annotator, gold_reward, gold_reward_fn, gold_rewards, gold_score, preference_probability
from .tokenizer import format_prompt, set_prompt_format, train_tokenizer
from .base_model import PRESETS, load_base_model, train_base_model
from .rollout import Rollout, generate, position_ids_from_mask, response_logprobs, sequence_logprob

# chapter 2: preferences and reward models
from .preferences import (generate_preferences, load_preference_data, load_preferences, preference_data_info,
                          save_preferences, split_prompts)
from .reward_model import (bradley_terry_loss, evaluate_preferences, load_reward_model, normalize_reward_model,
                           reward_fn_from_model, reward_model_from_lm, reward_scores, train_reward_model)

# chapters 3-4: advantages, losses, critics, A2C
from .advantage import discounted_returns, gae, masked_mean, masked_whiten, td_errors
from .rewards import apply_missing_eos_score, per_token_rewards, soft_overlong_penalty
from .losses import entropy_from_logits, policy_gradient_loss, value_loss
from .critic import PolicyWithValueHead, ValueModel, build_critic, response_values
from .experience import Experience, make_experience
from .trainer import OnPolicyConfig, OnPolicyTrainer, PolicyTrainer, TrainerConfig
from .a2c import A2CConfig, A2CTrainer

# chapter 5: KL and PPO
from .kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k2, kl_k3
from .ppo import PPOConfig, PPOTrainer, ppo_policy_loss
from .plotting import plot_run

# chapter 6: direct preference optimisation
from .dpo import DPOConfig, DPOTrainer, dpo_loss
from .sft import SFTConfig, SFTTrainer

# chapter 7: RL without a critic (REINFORCE, RLOO, GRPO and its variants), pass@k
from .critic_free import (CriticFreeConfig, CriticFreeTrainer, RunningMeanBaseline, aggregate_loss,
                          critic_free_policy_loss, evaluate_pass_at_k, grpo_advantages, pass_at_k, rloo_advantages)

# chapter 8: over-optimisation (best-of-n and its KL, reward-model ensembles, Gao et al.'s fits)
from .overoptimization import (BestOfN, EnsembleReward, GaoFit, best_of_n, best_of_n_distribution, best_of_n_kl_bound,
                               best_of_n_kl_estimate, best_of_n_kl_exact, best_of_n_kl_sampled, ensemble_reward_fn,
                               expected_best_of_n, fit_gao)
from .reward_model import load_reward_ensemble, train_reward_ensemble

# chapter 9: worlds as units (the reviews world and the arithmetic world), verifiable rewards
from .worlds import World, get_world, world_names
from .rewards import reward_fn_from_verifier

__version__ = "0.2.0"

__all__ = [
    "configure_threads", "get_device", "set_seed",
    "generate_examples", "prompt_split", "sample_prompts",
    "Annotator", "gold_reward", "gold_reward_fn", "gold_rewards", "gold_score", "preference_probability",
    "format_prompt", "set_prompt_format", "train_tokenizer", "PRESETS", "load_base_model", "train_base_model",
    "Rollout", "generate", "position_ids_from_mask", "response_logprobs", "sequence_logprob",
    "generate_preferences", "load_preference_data", "load_preferences", "preference_data_info", "save_preferences",
    "split_prompts", "bradley_terry_loss", "evaluate_preferences", "load_reward_model", "normalize_reward_model",
    "reward_fn_from_model", "reward_model_from_lm", "reward_scores", "train_reward_model",
    "discounted_returns", "gae", "masked_mean", "masked_whiten", "td_errors",
    "apply_missing_eos_score", "per_token_rewards", "soft_overlong_penalty", "entropy_from_logits",
    "policy_gradient_loss", "value_loss",
    "PolicyWithValueHead", "ValueModel", "build_critic", "response_values",
    "Experience", "make_experience", "OnPolicyConfig", "OnPolicyTrainer", "A2CConfig", "A2CTrainer",
    "AdaptiveKLController", "FixedKLController", "kl_k1", "kl_k2", "kl_k3",
    "PPOConfig", "PPOTrainer", "ppo_policy_loss", "plot_run",
    "PolicyTrainer", "TrainerConfig", "DPOConfig", "DPOTrainer", "dpo_loss", "SFTConfig", "SFTTrainer",
    "CriticFreeConfig", "CriticFreeTrainer", "RunningMeanBaseline", "aggregate_loss", "critic_free_policy_loss",
    "evaluate_pass_at_k", "grpo_advantages", "pass_at_k", "rloo_advantages",
    "BestOfN", "EnsembleReward", "GaoFit", "best_of_n", "best_of_n_distribution", "best_of_n_kl_bound",
    "best_of_n_kl_estimate", "best_of_n_kl_exact", "best_of_n_kl_sampled", "ensemble_reward_fn", "expected_best_of_n",
    "fit_gao", "load_reward_ensemble", "train_reward_ensemble",
    "World", "get_world", "world_names", "reward_fn_from_verifier",
]
