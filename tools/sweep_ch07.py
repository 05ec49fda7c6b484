"""Chapter 7's full experiment: PPO, RLOO, GRPO and Dr. GRPO at one sample budget, 3 seeds, two rewards.

    python tools/sweep_ch07.py                    # everything, ~30 min on 2 CPU cores (cached models)
    python tools/sweep_ch07.py --only rm --seeds 0  # a part

Writes one JSON line per finished run to ``data/results/ch07_critic_free.jsonl`` (the chapter plots
it); resumable like chapter 6's sweep (:mod:`sweep_common`). Every method sees the same number of
sampled replies (32 an iteration: PPO 32 prompts x 1, the critic-free ones 8 prompts x K = 4) and
makes the same optimizer steps on them (4 passes x 2 minibatches of 16), for ``ITERATIONS``; only
the advantage differs (a learned critic with GAE, the leave-one-out mean, the group mean over the
group std, the group mean alone), and where beta = 0.05 goes (PPO and RLOO: k1 in the reward;
GRPO and Dr. GRPO: k3 in the loss, as their papers and TRL do). Runs:

* ``rm``: against chapter 2's learned reward model (the gold reward only logged);
* ``gold``: against the gold reward itself (the best a reward model could be);
* ``hack``: GRPO with beta = 0 against the reward model (chapter 5's reward hacking, without a critic);
* ``ref``: pass@k of pi_ref, once per seed, the "before" of every run's pass@k;
* ``controls`` (against the reward model): ``grpo_unscaled`` (GRPO's loss without the std scaling: one switch
  from GRPO, one from Dr. GRPO) and ``reinforce`` (a running-mean baseline, 32 prompts x 1 reply).

PPO's critic is a separate copy of the trunk trained at 1e-3 (``PPOConfig``'s default since 0.2.0); ``ppo_head``
(``--methods ppo_head``) is PPO with the value head on detached features, the default before it, whose explained
variance never beat a constant baseline (chapter 5): the runs recorded before 0.2.0.

Every run is evaluated the same way: ``EVAL_REPEATS`` replies to each of the 30 held-out prompts
(fixed seed), proxy and gold scored, KL by k1; at the end pass@k on the gold reward thresholded at
``TAU`` from ``PASS_N`` replies per held-out prompt (their gold scores are kept, to recount at another
threshold).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)

from rlhf_book import gold_reward_fn, load_base_model, prompt_split
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer, evaluate_pass_at_k
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.runtime import configure_threads
from sweep_common import Results, compact

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch07_critic_free.jsonl"
SEEDS = (0, 1, 2)
ITERATIONS = 80
EVAL_REPEATS = 4
TAU, PASS_N, PASS_KS = 0.75, 16, (1, 2, 4, 8, 16)
BETA = 0.05
COMMON = {"max_new_tokens": 40, "lr": 1e-4, "minibatch_size": 16, "eval_every": 8, "eval_samples": 3,
          "progress": False}
PPO = {**COMMON, "batch_size": 32, "ppo_epochs": 4, "clip_range": 0.2, "critic": "separate",
       "critic_lr": 1e-3}  # chapter 5's base_config
GROUP = {**COMMON, "batch_size": 8, "num_generations": 4, "num_iterations": 4, "epsilon": 0.2}
METHODS = {
    "ppo": None,
    "rloo": {"advantage": "rloo", "kl_penalty": "reward", "loss_type": "dapo"},
    "grpo": {"advantage": "grpo", "scale_rewards": "group", "kl_penalty": "loss", "loss_type": "grpo"},
    "dr_grpo": {"advantage": "grpo", "scale_rewards": "none", "kl_penalty": "loss", "loss_type": "dr_grpo"},
}
HEAD = {"critic": "head", "critic_lr": None}  # "ppo_head": PPO with the critic that was its default before 0.2.0
# controls, against the reward model only: one switch at a time between GRPO and Dr. GRPO (GRPO's loss, no std
# scaling), and REINFORCE with a running-mean baseline (32 prompts x 1 reply, PPO's batch, beta in the reward)
CONTROLS = {
    "grpo_unscaled": {"advantage": "grpo", "scale_rewards": "none", "kl_penalty": "loss", "loss_type": "grpo"},
    "reinforce": {"advantage": "reinforce", "baseline_decay": 0.9, "kl_penalty": "reward", "loss_type": "dapo",
                  "batch_size": 32, "num_generations": 1},
}
ROW_KEYS = ("step", "proxy_reward", "gold_reward", "kl", "response_length", "terminated", "grad_norm", "entropy",
            "clipfrac", "reward_std", "advantage_std", "degenerate_groups", "generate_seconds", "experience_seconds",
            "update_seconds", "explained_variance", "eval_proxy_reward", "eval_gold_reward", "eval_kl", "eval_kl_k3",
            "eval_response_length", "eval_terminated")


def pass_at_k(model, tok, seed: int) -> dict:
    """pass@k on the held-out prompts, gold >= TAU, PASS_N replies each (their own sampling seed)."""
    _, eval_prompts = prompt_split(0)
    out = evaluate_pass_at_k(model, tok, eval_prompts, gold_reward_fn, TAU, n=PASS_N, ks=PASS_KS,
                             max_new_tokens=COMMON["max_new_tokens"], seed=10_000 + seed)
    out["scores"] = [[round(v, 4) for v in row] for row in out["scores"]]  # to recount at any threshold
    return {k: out[k] for k in out if k.startswith("pass@") or k in ("mean_score", "correct", "scores", "n", "tau")}


class Sweep(Results):
    def reward_fn(self, reward: str):
        return gold_reward_fn if reward == "gold" else self.book_reward_fn()

    def run(self, run: str, method: str, reward: str, beta: float, seed: int) -> None:
        t0 = time.time()
        train_prompts, eval_prompts = prompt_split(0)
        policy, tok = load_base_model("cpu", progress=False)
        ref, _ = load_base_model("cpu", progress=False)
        if method in ("ppo", "ppo_head"):
            cfg = {**PPO, **(HEAD if method == "ppo_head" else {}), "kl_coef": beta, "seed": seed}
            trainer = PPOTrainer(policy, ref, tok, self.reward_fn(reward), PPOConfig(**cfg), gold_fn=gold_reward_fn)
        else:
            cfg = {**GROUP, **{**METHODS, **CONTROLS}[method], "kl_coef": beta, "seed": seed}
            trainer = CriticFreeTrainer(policy, ref, tok, self.reward_fn(reward), CriticFreeConfig(**cfg),
                                        gold_fn=gold_reward_fn)
        history = trainer.train(train_prompts, ITERATIONS, checkpoint_dir=self.scratch(run),
                                eval_prompts=eval_prompts * EVAL_REPEATS)
        self.record(run, t0, method=method, reward=reward, beta=beta, seed=seed, iterations=ITERATIONS,
                    config=cfg, pass_at_k=pass_at_k(trainer.lm, tok, seed), history=compact(history, ROW_KEYS, digits=5))

    def reference(self, run: str, seed: int) -> None:
        t0 = time.time()
        ref, tok = load_base_model("cpu", progress=False)
        self.record(run, t0, method="ref", reward=None, beta=None, seed=seed, pass_at_k=pass_at_k(ref, tok, seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("ref", "rm", "gold", "hack", "controls"), action="append",
                    help="run only these parts")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--methods", nargs="*", choices=(*METHODS, "ppo_head"), default=list(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep, parts = Sweep(args.out), args.only or ["ref", "rm", "gold", "hack", "controls"]
    for seed in args.seeds:
        if "ref" in parts and f"ref/seed={seed}" not in sweep.done:
            sweep.reference(f"ref/seed={seed}", seed)
        for reward in ("rm", "gold"):
            if reward in parts:
                for method in args.methods:
                    run = f"{reward}/{method}/seed={seed}"
                    if run not in sweep.done:
                        sweep.run(run, method, reward, BETA, seed)
        if "hack" in parts and f"hack/grpo/seed={seed}" not in sweep.done:
            sweep.run(f"hack/grpo/seed={seed}", "grpo", "rm", 0.0, seed)
        for method in CONTROLS if "controls" in parts else ():
            if f"rm/{method}/seed={seed}" not in sweep.done:
                sweep.run(f"rm/{method}/seed={seed}", method, "rm", BETA, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
