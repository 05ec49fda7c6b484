"""Chapter 6's full experiment: DPO at several beta and PPO (chapter 5's recipe), 3 seeds each, on one protocol.

    python tools/sweep_ch06.py                     # everything, ~40 min on 2 CPU cores (cached models)
    python tools/sweep_ch06.py --only dpo --seeds 0  # a part

Writes one JSON line per finished run to ``data/results/ch06_dpo.jsonl`` (the chapter plots it). The
sweep is resumable: a run already in the file is skipped, and a run killed half-way continues from its
last checkpoint (``<results>.runs/<run>/``, removed when the run is done). Every run is evaluated the
same way: ``EVAL_REPEATS`` replies to each of the 30 held-out prompts, sampled with a fixed seed,
scored by the proxy reward model and the gold reward, KL to the reference by the k1 estimator.

Runs:

* ``dpo``: DPO (``loss_type="sigmoid"``) on chapter 2's 2,999 training pairs, beta in ``DPO_BETAS``,
  ``DPO_EPOCHS`` epochs, evaluated every quarter epoch;
* ``ppo``: PPO against chapter 2's reward model with chapter 5's config (and PPO's default critic, a separate
  copy of the trunk), beta in ``PPO_BETAS``, for ``PPO_ITERATIONS``; the critic's explained variance is recorded;
* ``data``: where DPO's pairs come from, at beta 0.1 and 1,500 pairs a round: round 1 on pairs
  sampled from pi_ref at T = 1 (the policy being trained, at its start) or at T = 2 (a weaker, noisier
  policy); round 2 continues the round-1 policy on 1,500 new pairs from pi_ref (offline) or from the
  round-1 policy itself (on-policy, iterative DPO). Pairs are labelled by the book's simulated
  annotators (Bradley-Terry on the gold reward, T = 0.25, as in chapter 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)

from rlhf_book import Annotator, generate_preferences, gold_reward_fn, gold_rewards, load_base_model, prompt_split
from rlhf_book.dpo import DPOConfig, DPOTrainer
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.preferences import load_preference_data
from rlhf_book.runtime import configure_threads
from sweep_common import Results, compact, ev_trace

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch06_dpo.jsonl"
SEEDS = (0, 1, 2)
EVAL_REPEATS = 4
DPO_BETAS = (0.03, 0.1, 0.3, 1.0)
DPO_EPOCHS = 3
DPO = dict(lr=1e-4, batch_size=32, eval_every=24, eval_samples=3, progress=False)  # 94 steps an epoch
PPO_BETAS = (0.0, 0.05, 0.2, 0.5, 1.0)  # 0.5: a PPO run near DPO's ~1 nat, for the budget comparison at matching KL
PPO_ITERATIONS = 80  # twice chapter 5's 40, so the beta > 0 runs reach their plateau
# chapter 5's base_config, with PPO's default critic (a separate copy of the trunk, lr 1e-3: chapter 5 shows it learns)
PPO = dict(batch_size=32, minibatch_size=16, ppo_epochs=4, lr=1e-4, clip_range=0.2, max_new_tokens=40, eval_every=4,
           eval_samples=3, progress=False)
DATA_BETA, DATA_PAIRS, DATA_EPOCHS = 0.1, 1500, 2
EVAL_KEYS = ("step", "epoch", "eval_proxy_reward", "eval_gold_reward", "eval_kl", "eval_kl_k3", "eval_response_length",
             "eval_terminated", "val_loss", "val_accuracy", "val_reward_margin", "loss", "accuracy", "reward_margin",
             "logp_chosen", "logp_rejected", "proxy_reward", "gold_reward", "kl")


def pairs_from(model, tok, prompts, n: int, temperature: float, seed: int) -> list[dict]:
    """n pairs sampled from ``model`` at ``temperature``, labelled by the book's simulated annotators."""
    raters = Annotator(gold_rewards, temperature=0.25, seed=seed + 7919)
    return generate_preferences(model, tok, prompts, n, raters, gold_fn=gold_rewards, temperatures=(temperature,),
                                max_new_tokens=48, seed=seed + 104729, progress=False)


class Sweep(Results):
    def dpo(self, run: str, pairs, beta: float, seed: int, epochs: float, policy=None, record: bool = True, **extra):
        """One DPO run (from pi_ref unless ``policy`` is given); returns the trained policy.

        ``record=False`` reruns a recorded run only for its policy (deterministic, so the same one).
        """
        t0 = time.time()
        _, eval_prompts = prompt_split(0)
        ref, tok = load_base_model("cpu", progress=False)
        if policy is None:
            policy, _ = load_base_model("cpu", progress=False)
        cfg = DPOConfig(beta=beta, seed=seed, **DPO)
        trainer = DPOTrainer(policy, ref, tok, cfg, reward_fn=self.book_reward_fn(), gold_fn=gold_reward_fn)
        history = trainer.train(pairs, epochs, checkpoint_dir=self.scratch(run) if record else None,
                                eval_prompts=eval_prompts * EVAL_REPEATS,
                                eval_pairs=load_preference_data("cpu", progress=False)["validation"])
        if record:
            self.record(run, t0, method="dpo", beta=beta, seed=seed, epochs=epochs, pairs=len(pairs), config=DPO,
                        history=compact(history, EVAL_KEYS, digits=None, only="eval_kl"), **extra)
        return policy

    def ppo(self, run: str, beta: float, seed: int):
        t0 = time.time()
        train_prompts, eval_prompts = prompt_split(0)
        policy, tok = load_base_model("cpu", progress=False)
        ref, _ = load_base_model("cpu", progress=False)
        trainer = PPOTrainer(policy, ref, tok, self.book_reward_fn(), PPOConfig(kl_coef=beta, seed=seed, **PPO),
                             gold_fn=gold_reward_fn)
        history = trainer.train(train_prompts, PPO_ITERATIONS, checkpoint_dir=self.scratch(run),
                                eval_prompts=eval_prompts * EVAL_REPEATS)
        self.record(run, t0, method="ppo", beta=beta, seed=seed, iterations=PPO_ITERATIONS, config=PPO,
                    history=compact(history, EVAL_KEYS, digits=None, only="eval_kl"), explained_variance=ev_trace(history))


def data_arms(sweep: Sweep, seed: int) -> None:
    """Round 1 from pi_ref's pairs at T = 1 or T = 2; round 2 on pairs from pi_ref or from the round-1 policy."""
    names = {arm: f"data/{arm}/seed={seed}" for arm in ("ref_T1", "ref_T2", "round2_offline", "round2_onpolicy")}
    todo = {arm for arm, run in names.items() if run not in sweep.done}
    if not todo:
        return
    ref, tok = load_base_model("cpu", progress=False)
    prompts = prompt_split(0)[0]  # the RL training prompts: chapter 2's pool
    if "ref_T2" in todo:
        sweep.dpo(names["ref_T2"], pairs_from(ref, tok, prompts, DATA_PAIRS, 2.0, seed + 1), DATA_BETA, seed, DATA_EPOCHS,
                  source="pi_ref at T=2 (a weaker policy)")
    if not todo & {"ref_T1", "round2_offline", "round2_onpolicy"}:
        return
    pi1 = sweep.dpo(names["ref_T1"], pairs_from(ref, tok, prompts, DATA_PAIRS, 1.0, seed), DATA_BETA, seed, DATA_EPOCHS,
                    record="ref_T1" in todo, source="pi_ref at T=1 (the policy at its start)")
    if "round2_offline" in todo:
        pi1_copy = load_base_model("cpu", progress=False)[0]
        pi1_copy.load_state_dict(pi1.state_dict())
        sweep.dpo(names["round2_offline"], pairs_from(ref, tok, prompts, DATA_PAIRS, 1.0, seed + 2), DATA_BETA, seed,
                  DATA_EPOCHS, policy=pi1_copy, source="round 1, then new pairs from pi_ref")
    if "round2_onpolicy" in todo:
        sweep.dpo(names["round2_onpolicy"], pairs_from(pi1, tok, prompts, DATA_PAIRS, 1.0, seed + 2), DATA_BETA, seed,
                  DATA_EPOCHS, policy=pi1, source="round 1, then pairs from the round-1 policy")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("dpo", "ppo", "data"), action="append", help="run only these parts")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep, parts = Sweep(args.out), args.only or ["dpo", "ppo", "data"]
    data = load_preference_data("cpu", progress=False)
    for seed in args.seeds:
        if "dpo" in parts:
            for beta in DPO_BETAS:
                run = f"dpo/beta={beta}/seed={seed}"
                if run not in sweep.done:
                    sweep.dpo(run, data["train"], beta, seed, DPO_EPOCHS)
        if "ppo" in parts:
            for beta in PPO_BETAS:
                run = f"ppo/beta={beta}/seed={seed}"
                if run not in sweep.done:
                    sweep.ppo(run, beta, seed)
        if "data" in parts:
            data_arms(sweep, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
