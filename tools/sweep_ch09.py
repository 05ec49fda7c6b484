"""Chapter 9's full experiment: RL with verifiable rewards on the arithmetic world, 3 seeds per arm.

    python tools/sweep_ch09.py                      # everything: ~60 min of one CPU thread (RLHF_BOOK_THREADS=1;
                                                    # two processes with different --arms share 2 cores in ~30)
    python tools/sweep_ch09.py --arms grpo dapo --seeds 0   # a part

Writes one JSON line per finished run to ``data/results/ch09_verifiable.jsonl`` (the chapter plots
it); resumable and kill-safe like the other sweeps (:mod:`sweep_common`): a run killed half-way
continues from its last checkpoint. Every run starts from the ``cpu`` preset's policy
(:mod:`rlhf_book.worlds.arithmetic`), trains on the train-split problems of the five difficulties
it learnt, and sees the same budget: ``ITERATIONS`` iterations of 16 prompts x 8 replies, one
optimizer step each (on-policy), beta = 0 (no reference model in the loss, as DAPO and Dr. GRPO
run it). Arms (``ARMS``):

* the estimators against the strict 0/1 verifier: ``grpo`` (group mean / group std, sequence means),
  ``dr_grpo`` (group mean only, sum / (N * max tokens)), ``rloo`` (leave-one-out mean, token mean),
  ``dapo`` (GRPO's advantage, token mean, clip-higher 0.28, dynamic sampling of non-degenerate groups,
  soft overlong penalty over the last 8 tokens);
* reward design, each GRPO: ``format`` (1 for the ``#### N`` format, right or wrong), ``any`` (the lenient
  verifier that accepts a reply when *any* number in it is the answer: the exploit), ``random`` (a fair coin
  per reply, the spurious-reward control);
* outcome vs process rewards: ``process`` (GRPO with per-step rewards normalised over the group, DeepSeekMath's
  process supervision), ``ppo`` and ``ppo_process`` (PPO with a separate critic and GAE, the outcome reward on the
  last token vs a reward at the end of each step).

Evaluation (every run the same way, held-out problems only): accuracy per difficulty (strict
verifier, ``EVAL_SAMPLES`` replies at temperature 1 to each of ``EVAL_PROBLEMS`` problems of every
difficulty, the three the policy never trained on included), what the lenient ``any`` and the format
verifiers accept, mean reply length; pass@k for k up to ``PASS_N`` = 256 on ``PASS_PROBLEMS`` problems
per difficulty (the ``ref`` records: the base policy, three sampling seeds; and the ``grpo`` runs after training).
Training rows keep the share of degenerate groups and the reply length per iteration.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)

import torch
from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer, evaluate_pass_at_k
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.rewards import reward_fn_from_verifier
from rlhf_book.rollout import generate
from rlhf_book.runtime import configure_threads
from rlhf_book.worlds import arithmetic as A
from sweep_common import Results, compact

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch09_verifiable.jsonl"
PRESET = "cpu"
SEEDS = (0, 1, 2)
ITERATIONS = 120
EVAL_PROBLEMS, EVAL_SAMPLES = 100, 4
PASS_PROBLEMS, PASS_N = 40, 256
PASS_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PASS_DIFFICULTIES = ("add3", "mul2", "chain3", "add4", "mul3", "chain5")
COMMON = {"batch_size": 16, "max_new_tokens": 48, "lr": 3e-4, "kl_coef": 0.0, "eval_every": 10, "eval_samples": 4,
          "progress": False}
GROUP = {**COMMON, "num_generations": 8, "num_iterations": 1}
GRPO = {"advantage": "grpo", "scale_rewards": "group", "loss_type": "grpo"}
ARMS = {  # name: (trainer, config, reward)
    "grpo": ("group", GRPO, "strict"),
    "dr_grpo": ("group", {"advantage": "grpo", "scale_rewards": "none", "loss_type": "dr_grpo"}, "strict"),
    "rloo": ("group", {"advantage": "rloo", "loss_type": "dapo"}, "strict"),
    "dapo": ("group", {**GRPO, "loss_type": "dapo", "epsilon_high": 0.28, "dynamic_sampling": True,
                       "overlong_buffer": 8}, "strict"),
    "format": ("group", GRPO, "format"),
    "any": ("group", GRPO, "any"),
    "random": ("group", GRPO, "random"),
    "process": ("group", {**GRPO, "advantage": "process"}, "process"),
    "ppo": ("ppo", {"critic": "separate", "critic_lr": 1e-3, "ppo_epochs": 1}, "strict"),
    "ppo_process": ("ppo", {"critic": "separate", "critic_lr": 1e-3, "ppo_epochs": 1}, "process"),
}
ROW_KEYS = ("step", "proxy_reward", "gold_reward", "response_length", "terminated", "entropy", "clipfrac",
            "degenerate_groups", "sampling_rounds", "sampled_degenerate_groups", "dropped_groups", "explained_variance", "grad_norm", "eval_proxy_reward",
            "eval_gold_reward", "eval_response_length")


def random_reward(seed: int):
    """The spurious-reward control: 1 or 0 by a coin, seeded by the run and the reply (not by its correctness)."""
    def coin(prompt, response) -> float:
        h = hashlib.sha256(f"{seed}|{prompt}|{response}".encode()).digest()
        return float(h[0] & 1)

    coin.__name__ = "coin"
    return reward_fn_from_verifier(coin, name="random_reward")


def reward(kind: str, seed: int):
    return random_reward(seed) if kind == "random" else A.reward_fn(kind=kind)


def world() -> str:
    """12 hex digits of the arithmetic policy's weights (another CPU may build another one)."""
    f = A.policy_path(PRESET) / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest()[:12] if f.is_file() else None


@torch.no_grad()
def evaluate(model, tok, seed: int) -> dict:
    """Per difficulty: strict accuracy, and the shares the ``any`` and format verifiers accept, of sampled replies."""
    out, examples = {}, []
    for name, problems in A.heldout_sets(EVAL_PROBLEMS, seed=0).items():
        texts = [p.prompt for p in problems]
        gen = torch.Generator().manual_seed(20_000 + seed)
        ro = generate(model, tok, texts, max_new_tokens=COMMON["max_new_tokens"], temperature=1.0, generator=gen,
                      samples_per_prompt=EVAL_SAMPLES)
        ended = ro.terminated.tolist()
        pairs = [(texts[i // EVAL_SAMPLES], r, t) for i, (r, t) in enumerate(zip(ro.responses, ended))]
        strict = [t and A.verify(r, A.parse_problem(p).answer, "strict") for p, r, t in pairs]
        anyv = [A.verify(r, A.parse_problem(p).answer, "any") for p, r, t in pairs]
        fmt = [t and A.is_well_formed(r) for p, r, t in pairs]
        lengths = ro.response_mask.sum(1).float()
        out[name] = {"accuracy": sum(strict) / len(pairs), "any": sum(anyv) / len(pairs),
                     "format": sum(fmt) / len(pairs), "length": round(float(lengths.mean()), 2)}
        rows = [{"difficulty": name, "prompt": p, "response": r, "strict": s, "any": a}
                for (p, r, _), s, a in zip(pairs, strict, anyv)]
        examples += rows[:: EVAL_SAMPLES * 25] + [e for e in rows if e["any"] and not e["strict"]][:3]
    return {"by_difficulty": {k: {m: round(v, 4) for m, v in d.items()} for k, d in out.items()}, "examples": examples}


def pass_at_k(model, tok, seed: int) -> dict:
    """pass@k (strict verifier) for k up to PASS_N, per difficulty, and the correct counts per problem."""
    out = {}
    for name in PASS_DIFFICULTIES:
        problems = A.heldout_problems(name, PASS_PROBLEMS, seed=1)
        r = evaluate_pass_at_k(model, tok, [p.prompt for p in problems], A.strict_reward, 0.5, n=PASS_N, ks=PASS_KS,
                               max_new_tokens=COMMON["max_new_tokens"], seed=30_000 + seed, batch_size=1024,
                               threads=None)
        out[name] = {"correct": r["correct"], **{f"pass@{k}": round(r[f"pass@{k}"], 4) for k in PASS_KS}}
    return out


class Sweep(Results):
    def run(self, run: str, arm: str, seed: int, with_pass: bool) -> None:
        t0 = time.time()
        kind, extra, reward_kind = ARMS[arm]
        policy, tok = A.load_policy(PRESET, device="cpu", progress=False)
        ref = copy.deepcopy(policy)
        train = A.prompts("train", 4096, seed=seed)
        eval_prompts = A.prompts("eval", 64)
        fn = reward(reward_kind, seed)
        if kind == "ppo":
            cfg = {**COMMON, "batch_size": COMMON["batch_size"] * GROUP["num_generations"], **extra, "seed": seed}
            trainer = PPOTrainer(policy, ref, tok, fn, PPOConfig(**cfg), gold_fn=A.strict_reward)
        else:
            cfg = {**GROUP, **extra, "seed": seed}
            trainer = CriticFreeTrainer(policy, ref, tok, fn, CriticFreeConfig(**cfg), gold_fn=A.strict_reward)
        history = trainer.train(train, ITERATIONS, checkpoint_dir=self.scratch(run), eval_prompts=eval_prompts)
        self.record(run, t0, arm=arm, reward=reward_kind, seed=seed, iterations=ITERATIONS, config=cfg,
                    eval=evaluate(trainer.lm, tok, seed), pass_at_k=pass_at_k(trainer.lm, tok, seed) if with_pass else None,
                    history=compact(history, ROW_KEYS, digits=4))

    def reference(self, run: str, seed: int) -> None:
        t0 = time.time()
        policy, tok = A.load_policy(PRESET, device="cpu", progress=False)
        self.record(run, t0, arm="ref", reward=None, seed=seed, eval=evaluate(policy, tok, seed),
                    pass_at_k=pass_at_k(policy, tok, seed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", choices=("ref", *ARMS), default=["ref", *ARMS])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.out, world=world)
    for seed in args.seeds:
        for arm in args.arms:
            run = f"{arm}/seed={seed}"
            if run in sweep.done:
                continue
            if arm == "ref":
                sweep.reference(run, seed)
            else:
                sweep.run(run, arm, seed, with_pass=arm == "grpo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
