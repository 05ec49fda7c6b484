"""Chapter 8's full experiment: best-of-n and PPO against reward models of several sizes, noise and ensembles.

    python tools/sweep_ch08.py                 # everything, ~35 min on 2 CPU cores (cached base model)
    python tools/sweep_ch08.py --only bon      # a part

Writes one JSON line per finished run to ``data/results/ch08_overoptimization.jsonl`` (the chapter plots
it); resumable like the other chapters' sweeps (:mod:`sweep_common`). The reward models it needs are
built once and cached by the library (``load_reward_ensemble``), so a killed sweep rebuilds none it
finished. Runs:

* ``bon/seed=s``: ``BON_N`` replies of the base model to each of the 30 held-out prompts (sampling seed
  s), every one scored by the gold reward and by every reward model below, with its log-probability
  under the base model: one draw gives the whole best-of-n' curve of each reward model for n' <= BON_N
  (:func:`rlhf_book.expected_best_of_n`) and its KL estimate.
* ``ppo/<proxy>/seed=s``: PPO (chapter 5's config, beta = 0, ``PPO_ITERATIONS``) against one proxy:
  the reward model trained on the 25%-noisy labels, or the mean, the minimum or mean - 1 std of the
  4 reward models trained on them (Coste et al. 2023);
* ``razin/<proxy>/seed=s``: PPO (chapter 5's config, beta = 0.05, ``PPO_ITERATIONS``) against the book's
  reward model r and against ``flat(r) = softplus(4 (r - 1.5)) / 4``, a strictly increasing transform
  of it: the same ranking of every pair (the same accuracy), but nearly flat where the base model's
  replies lie (Razin et al. 2025: accuracy does not make a good teacher); ``flat_rm_matched`` is flat(r) at
  :func:`razin_matched_beta`, beta times the ratio of the two rewards' spreads, which removes the larger
  effective beta that a flatter reward has under whitened advantages;
* ``coste/<proxy>/seed=s``: PPO at beta = ``COSTE_BETA`` against one noisy reward model and against the
  ensemble's mean - 1 std (Coste et al. 2023: ensembles with a small KL penalty).

Every PPO run here uses PPO's default critic (a separate copy of the trunk, chapter 5); its explained variance is
recorded. At beta = 0 it means little: the returns' spread collapses as the policy runs away (chapter 5).

Reward models (all chapter 2's recipe on chapter 2's pairs, normalised on the same base-model replies):
``rm_3000`` (the book's), ``rm_1000`` and ``rm_300`` (a random third and tenth of the 2,999 pairs),
``noisy_0`` .. ``noisy_3`` (all pairs, 25% of the labels flipped, the same flips for every member,
4 training seeds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)
import torch

from rlhf_book import best_of_n, ensemble_reward_fn, gold_reward_fn, load_base_model, prompt_split
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.reward_model import load_reward_ensemble, load_reward_model, reward_fn_from_model
from rlhf_book.runtime import configure_threads
from rlhf_book.trainer import read_metrics
from sweep_common import Results, ev_trace

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch08_overoptimization.jsonl"
SEEDS = (0, 1, 2)
BON_N = 256
MAX_NEW_TOKENS = 40
LABEL_NOISE, K = 0.25, 4
PPO_ITERATIONS = 80
# chapter 5's config at beta 0, with PPO's default critic (a separate copy of the trunk, lr 1e-3)
PPO = {"batch_size": 32, "minibatch_size": 16, "ppo_epochs": 4, "lr": 1e-4, "clip_range": 0.2, "kl_coef": 0.0,
       "max_new_tokens": MAX_NEW_TOKENS, "eval_every": 4, "eval_samples": 3, "progress": False}
EVAL_REPEATS = 4
RAZIN_BETA = 0.05


def razin_matched_beta(sweep) -> float:
    """RAZIN_BETA times std(flat(r)) / std(r) over the 7,680 base-model replies of the recorded draw ``bon/seed=0``.

    With whitened advantages, scaling a reward by c is dividing beta by c, so flat(r) at beta = 0.05 weighs the KL
    as r does at a much larger beta; the matched arm divides beta by the ratio of the two rewards' spreads (about
    0.04 in the world of the committed runs), so the two runs weigh the KL against the reward's spread alike.
    """
    draw = next((r for r in read_metrics(sweep.path) if r["run"] == "bon/seed=0"), None)
    if draw is None:
        raise ValueError(f"{sweep.path}: the matched Razin arm needs the draw bon/seed=0 recorded first "
                         "(python tools/sweep_ch08.py --only bon --seeds 0)")
    r = torch.tensor(draw["scores"]["rm_3000"]).flatten()
    return RAZIN_BETA * flattened(r).std().item() / r.std().item()

# Coste et al.: the ensemble's conservative objective with a small KL penalty, against one member with it
COSTE_BETA = 0.01
COSTE = ("noisy_single", "noisy_mean_minus_std")
PROXIES = {"noisy_single": None, "noisy_mean": "mean", "noisy_min": "min", "noisy_mean_minus_std": "mean_minus_std"}
EVAL_KEYS = ("step", "eval_proxy_reward", "eval_gold_reward", "eval_kl", "eval_kl_k3", "eval_response_length",
             "proxy_reward", "gold_reward", "kl")


def reward_models() -> dict:
    """name -> reward function of every reward model of the sweep (built and cached on first use)."""
    fns = {}
    rm, tok = load_reward_model("cpu", progress=False)
    fns["rm_3000"] = reward_fn_from_model(rm, tok)
    for name, fraction in (("rm_1000", 1000 / 2999), ("rm_300", 300 / 2999)):
        (model,), tok = load_reward_ensemble("cpu", k=1, data_fraction=fraction, progress=False)
        fns[name] = reward_fn_from_model(model, tok)
    models, tok = load_reward_ensemble("cpu", k=K, label_noise=LABEL_NOISE, progress=False)
    for i, model in enumerate(models):
        fns[f"noisy_{i}"] = reward_fn_from_model(model, tok)
    return fns


def flattened(r: torch.Tensor) -> torch.Tensor:
    """softplus(4 (r - 1.5)) / 4: strictly increasing in r, so it ranks every pair alike, and nearly flat below 1."""
    import torch.nn.functional as F

    return F.softplus(4 * (r - 1.5)) / 4


def flat(reward_fn):
    """:func:`flattened` scores of a reward function."""
    def fn(prompts, responses, terminated=None):
        return flattened(torch.as_tensor(reward_fn(prompts, responses, terminated), dtype=torch.float32))

    return fn


def rounded(t, digits: int = 3) -> list:
    return [[round(float(v), digits) for v in row] for row in t.tolist()]


class Sweep(Results):
    def __init__(self, path: Path):
        super().__init__(path)
        self._fns = None

    @property
    def fns(self) -> dict:
        if self._fns is None:
            self._fns = reward_models()
        return self._fns

    def bon(self, run: str, seed: int) -> None:
        t0 = time.time()
        _, eval_prompts = prompt_split(0)
        base, tok = load_base_model("cpu", progress=False)
        draw = best_of_n(base, tok, eval_prompts, BON_N, self.fns["rm_3000"], max_new_tokens=MAX_NEW_TOKENS, seed=seed)
        scores = {"gold": rounded(draw.score(gold_reward_fn))}
        scores.update({name: rounded(draw.score(fn)) for name, fn in self.fns.items()})
        self.record(run, t0, part="bon", seed=seed, n=BON_N, prompts=draw.prompts, scores=scores,
                    logprobs=rounded(draw.logprobs, 4), terminated=draw.terminated.int().tolist())

    def ppo(self, run: str, proxy: str, seed: int) -> None:
        t0 = time.time()
        train_prompts, eval_prompts = prompt_split(0)
        if proxy in ("rm", "flat_rm", "flat_rm_matched"):  # the Razin et al. pair, at beta = RAZIN_BETA (or matched)
            reward = self.fns["rm_3000"] if proxy == "rm" else flat(self.fns["rm_3000"])
            config = {**PPO, "kl_coef": razin_matched_beta(self) if proxy == "flat_rm_matched" else RAZIN_BETA}
        else:
            members = [self.fns[f"noisy_{i}"] for i in range(K)]
            reward = members[0] if PROXIES[proxy] is None else ensemble_reward_fn(members, PROXIES[proxy], lam=1.0)
            config = {**PPO, "kl_coef": COSTE_BETA} if run.startswith("coste/") else PPO
        policy, tok = load_base_model("cpu", progress=False)
        ref, _ = load_base_model("cpu", progress=False)
        trainer = PPOTrainer(policy, ref, tok, reward, PPOConfig(seed=seed, **config), gold_fn=gold_reward_fn)
        history = trainer.train(train_prompts, PPO_ITERATIONS, checkpoint_dir=self.scratch(run),
                                eval_prompts=eval_prompts * EVAL_REPEATS)
        rows = [{k: h[k] for k in EVAL_KEYS if k in h} for h in history if "eval_kl" in h]
        rows[-1]["eval_samples"] = history[-1].get("eval_samples")
        self.record(run, t0, part=run.split("/")[0], proxy=proxy, seed=seed, iterations=PPO_ITERATIONS, config=config,
                    history=rows, explained_variance=ev_trace(history))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("bon", "ppo", "razin", "coste"), action="append", help="run only these parts")
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep, parts = Sweep(args.out), args.only or ["bon", "ppo", "razin", "coste"]
    for seed in args.seeds:
        if "bon" in parts and f"bon/seed={seed}" not in sweep.done:
            sweep.bon(f"bon/seed={seed}", seed)
    for seed in args.seeds:
        for proxy in PROXIES:
            run = f"ppo/{proxy}/seed={seed}"
            if "ppo" in parts and run not in sweep.done:
                sweep.ppo(run, proxy, seed)
    for seed in args.seeds:
        for proxy in ("rm", "flat_rm", "flat_rm_matched"):
            run = f"razin/{proxy}/seed={seed}"
            if "razin" in parts and run not in sweep.done:
                sweep.ppo(run, proxy, seed)
    for seed in args.seeds:
        for proxy in COSTE:
            run = f"coste/{proxy}/seed={seed}"
            if "coste" in parts and run not in sweep.done:
                sweep.ppo(run, proxy, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
