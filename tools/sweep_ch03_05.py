"""Chapters 3-5's headline runs over 3 seeds, evaluated densely on 4 replies per held-out prompt.

    python tools/sweep_ch03_05.py                       # everything, ~25 min on 2 CPU cores (cached models)
    python tools/sweep_ch03_05.py --only ch5 --seeds 0  # a part

Writes one JSON line per finished run to ``data/results/ch03_05_seeds.jsonl``; resumable like the
other chapters' sweeps (:mod:`sweep_common`). Every run is the chapter's own (its models, chapter
2's reward model as the reward, the gold reward only logged, ``prompt_split(0)``, its config and
iterations), with two changes so that differences stand above the noise: ``eval_every = 5`` and
``EVAL_REPEATS`` replies to each of the 32 held-out prompts (fixed seed) at every evaluation. Parts:

* ``ch3``: A2C (chapter 3's ``A2CConfig``, 40 iterations) with beta = 0.05 and beta = 0: the claim
  is that the KL penalty keeps the gold reward that beta = 0 gives away to the learned reward model;
* ``ch4``: A2C with TD(0) advantages (``lam = 0``, 30 iterations) and 0 / 1 / 4 critic steps per
  iteration (``value_updates``): proxy, gold, response length and the critic's explained variance;
* ``ch5``: PPO (chapter 5's ``base_config``, 40 iterations) at each of its ``BETAS`` = 0, 0.05, 0.2:
  reward hacking at beta = 0 (proxy up, gold down, KL tens of nats) against the penalised runs;
* ``ch5_head``: the same PPO runs with the critic that was PPO's default until 0.2.0, a linear value head on the
  policy's detached features at the policy's learning rate (``critic="head"``): what a critic that does not
  learn costs (its explained variance stays near 0; the separate critic's, PPO's default now, well above);
* ``ch5_critics``: PPO at beta = 0 and 0.05 with two separate critics, the default copy of the policy's trunk
  and one initialised from the reward model (InstructGPT's), ``eval_every = 10``; every row also has the returns'
  variance over the batch (``return_var``, explained variance's denominator): is the critic's low explained
  variance at beta = 0 the critic's doing, or the returns'?
* ``adaptive``: PPO with the adaptive KL controller (``ADAPTIVE``: Ziegler et al.'s rule with a short
  horizon, so that beta can move enough within the run), ``ADAPTIVE_ITERATIONS``; the claim is that
  the KL settles near ``kl_target``.

Measured on 2 shared CPU cores: 1,460 s of runs in all (ch3 270 s, ch4 270 s, ch5 630 s, adaptive 290 s;
an A2C run 20-60 s, a PPO run of 40 iterations 45-100 s), inside the 45-minute budget, so every part runs
the chapter's full number of iterations (the adaptive run twice as many as section 5.5, to show that the
KL stays at the target once it has reached it). ``ch5_critics`` was added later and run on another machine (an
AMD EPYC, world digest in its records): 12 runs of 50-70 s each on one thread, in two processes.

Each record: the part, the knobs, the seed, the config, and every iteration's row with the keys in
``ROW_KEYS`` (4 significant digits; eval keys on the evaluated iterations), the eval samples of the last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)

from rlhf_book import gold_reward_fn, load_base_model, prompt_split
from rlhf_book.a2c import A2CConfig, A2CTrainer
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.runtime import configure_threads
from sweep_common import Results, compact

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch03_05_seeds.jsonl"
SEEDS = (0, 1, 2)
EVAL_REPEATS = 4
DENSE = {"eval_every": 5, "progress": False}
# chapter 3: A2CConfig(seed, kl_coef, eval_every=10, missing_eos_score=None), 40 iterations
CH3_ITERATIONS, CH3_BETAS = 40, (0.05, 0.0)
# chapter 4: A2CConfig(seed, lam=0.0, value_updates=k, eval_every=10, missing_eos_score=None), 30 iterations
CH4_ITERATIONS, CH4_VALUE_UPDATES = 30, (0, 1, 4)
# chapter 5: base_config and BETAS of section 5.5, 40 iterations (eval_every 4 there)
CH5_ITERATIONS, CH5_BETAS = 40, (0.0, 0.05, 0.2)
# the chapters' A2C runs keep A2CConfig's default before 0.2.0 (no missing-EOS score), which the recorded runs used
A2C_BASE = {"missing_eos_score": None}
PPO_BASE = {"batch_size": 32, "minibatch_size": 16, "ppo_epochs": 4, "lr": 1e-4, "clip_range": 0.2,
            "max_new_tokens": 40, "eval_samples": 4, "critic": "separate", "critic_lr": 1e-3}
HEAD = {"critic": "head", "critic_lr": None}  # PPO's default critic before 0.2.0
# part ch5_critics: the trunk copy (PPO's default) against a critic that starts as the reward model
CRITIC_BETAS, CRITIC_INITS, CRITIC_EVAL = (0.0, 0.05), ("trunk", "reward_model"), {"eval_every": 10}
# the adaptive controller: beta <- beta (1 + clip(KL / target - 1, +-0.2) * 32 / horizon), at most 6.4% a batch
# with horizon 100 (0.064% with the paper's 10,000: beta would not move in a run this short); from the chapter's
# middle beta, whose fixed run overshoots the target (5-10 nats at iteration 40)
ADAPTIVE = {"kl_coef": 0.05, "kl_target": 4.0, "kl_horizon": 100.0}
ADAPTIVE_ITERATIONS = 80
ROW_KEYS = ("step", "proxy_reward", "gold_reward", "kl", "kl_k3", "beta", "next_beta", "response_length",
            "terminated", "entropy", "explained_variance", "return_var", "value_loss", "eval_proxy_reward",
            "eval_gold_reward", "eval_kl", "eval_kl_k3", "eval_response_length", "eval_terminated")


def run_config(algo: str, knobs: dict, seed: int) -> tuple[dict, str | None]:
    """(the trainer config's fields, the critic's start: None, "trunk" or "reward_model") of one run of the plan."""
    knobs = dict(knobs)
    critic_init = knobs.pop("critic_init", None)  # ch5_critics: "trunk" (the config's default) or "reward_model"
    if algo == "a2c":
        return {**A2C_BASE, **DENSE, **knobs, "seed": seed}, critic_init
    return {**PPO_BASE, **DENSE, **(CRITIC_EVAL if critic_init else {}), **knobs, "seed": seed}, critic_init


class Sweep(Results):
    def run(self, run: str, part: str, algo: str, knobs: dict, iterations: int, seed: int) -> None:
        t0 = time.time()
        train_prompts, eval_prompts = prompt_split(0)
        policy, tok = load_base_model("cpu", progress=False)
        ref, _ = load_base_model("cpu", progress=False)
        cfg, critic_init = run_config(algo, knobs, seed)
        if algo == "a2c":
            trainer = A2CTrainer(policy, ref, tok, self.book_reward_fn(), A2CConfig(**cfg), gold_fn=gold_reward_fn)
        else:
            critic = None
            if critic_init == "reward_model":
                from rlhf_book.critic import ValueModel
                from rlhf_book.reward_model import load_reward_model

                critic = ValueModel.from_reward_model(load_reward_model("cpu", progress=False)[0])
            trainer = PPOTrainer(policy, ref, tok, self.book_reward_fn(), PPOConfig(**cfg), critic=critic,
                                 gold_fn=gold_reward_fn)
        history = trainer.train(train_prompts, iterations, checkpoint_dir=self.scratch(run),
                                eval_prompts=eval_prompts * EVAL_REPEATS)
        self.record(run, t0, part=part, algo=algo, **knobs, seed=seed, iterations=iterations,
                    eval_repeats=EVAL_REPEATS, config=cfg, history=compact(history, ROW_KEYS))


def plan(parts: list[str], seeds: list[int]) -> list[tuple]:
    """(run name, part, algorithm, knobs, iterations, seed) of every run, seed-major."""
    out = []
    for seed in seeds:
        if "ch3" in parts:
            out += [(f"ch3/a2c/beta={b}/seed={seed}", "ch3", "a2c", {"kl_coef": b}, CH3_ITERATIONS, seed)
                    for b in CH3_BETAS]
        if "ch4" in parts:
            out += [(f"ch4/a2c/value_updates={k}/seed={seed}", "ch4", "a2c", {"lam": 0.0, "value_updates": k},
                     CH4_ITERATIONS, seed) for k in CH4_VALUE_UPDATES]
        if "ch5" in parts:
            out += [(f"ch5/ppo/beta={b}/seed={seed}", "ch5", "ppo", {"kl_coef": b}, CH5_ITERATIONS, seed)
                    for b in CH5_BETAS]
        if "ch5_head" in parts:
            out += [(f"ch5/ppo_head/beta={b}/seed={seed}", "ch5_head", "ppo", {"kl_coef": b, **HEAD}, CH5_ITERATIONS,
                     seed) for b in CH5_BETAS]
        if "ch5_critics" in parts:
            out += [(f"ch5/ppo_critic={c}/beta={b}/seed={seed}", "ch5_critics", "ppo", {"kl_coef": b, "critic_init": c},
                     CH5_ITERATIONS, seed) for b in CRITIC_BETAS for c in CRITIC_INITS]
        if "adaptive" in parts:
            name = "ch5/ppo_adaptive/" + ",".join(f"{k}={v:g}" for k, v in ADAPTIVE.items()) + f"/seed={seed}"
            out.append((name, "adaptive", "ppo", dict(ADAPTIVE), ADAPTIVE_ITERATIONS, seed))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("ch3", "ch4", "ch5", "ch5_head", "ch5_critics", "adaptive"), action="append",
                    help="run only these parts")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.out)
    for run, *spec in plan(args.only or ["ch3", "ch4", "ch5", "ch5_head", "ch5_critics", "adaptive"], args.seeds):
        if run not in sweep.done:
            sweep.run(run, *spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
