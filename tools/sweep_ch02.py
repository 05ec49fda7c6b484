"""Chapter 2's biased-annotator experiment (section 2.11) over 3 seeds: annotator bias -> reward model -> policy.

    python tools/sweep_ch02.py              # everything, ~10 min on 2 CPU cores (cached models)
    python tools/sweep_ch02.py --seeds 0    # one seed

Writes one JSON line per seed to ``data/results/ch02_biased.jsonl`` (the chapter prints its spread and
plots it); resumable like the other chapters' sweeps (:mod:`sweep_common`). Per seed, exactly what
the chapter runs live for seed 0:

* ``N_PAIRS`` pairs of base-LM replies to the train prompts of the book's preference data, sampled once
  (``generate_preferences`` with the seed) and labelled twice: by the book's annotator (Bradley-Terry on
  the gold reward) and by a *verbose* one whose reward is gold + ``BONUS`` per word of the reply;
* one reward model per labelling (same recipe, same seed), normalised on the base LM's replies to the
  held-out prompts; their accuracy on the book's 1,000 test pairs (vs labels and vs gold), and the
  correlation of their score with reply length on those held-out replies (chapter 2's own reward
  model and the gold reward alongside);
* best-of-``BON_N`` on the held-out prompts: one set of n candidates per prompt, the kept reply's
  length in words and gold reward when each scorer picks;
* PPO (chapter 5's ``base_config``, beta = ``BETA``, ``PPO_ITERATIONS``) against each of the two
  reward models and chapter 2's own, the gold only logged; history rows and a final evaluation of
  ``FINAL_REPEATS`` replies per held-out prompt (words, gold, every reward model's score), and the same
  evaluation of the base LM (``ppo_base``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # first: it sets OMP_WAIT_POLICY before torch loads

import torch

import rlhf_book.overoptimization as oo
from rlhf_book import Annotator, generate, gold_reward_fn, load_base_model, prompt_split
from rlhf_book.ppo import PPOConfig, PPOTrainer
from rlhf_book.preferences import generate_preferences, load_preference_data
from rlhf_book.reward_model import (
    evaluate_preferences, load_reward_model, normalize_reward_model, reward_fn_from_model, reward_model_from_lm,
    score_pairs, train_reward_model,
)
from rlhf_book.runtime import configure_threads
from sweep_common import Results, compact

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch02_biased.jsonl"
SEEDS = (0, 1, 2)
BONUS = 0.1          # the verbose annotator's reward: gold + BONUS * (words in the reply)
N_PAIRS = 800
RM = {"epochs": 2, "batch_size": 32, "lr": 1e-3}   # section 2.8's small-model recipe
SAMPLING = {"temperatures": (1.0, 1.5, 2.0), "weights": (0.7, 0.2, 0.1)}  # the book's preference recipe
REF_REPEATS, REF_SEED, MAX_NEW_TOKENS = 8, 1, 48  # section 2.9's held-out base-LM replies
BON_N, BON_SEED = 16, 100
PPO_ITERATIONS, BETA, EVAL_REPEATS, FINAL_REPEATS = 20, 0.05, 4, 8
PPO_BASE = {"batch_size": 32, "minibatch_size": 16, "ppo_epochs": 4, "lr": 1e-4, "clip_range": 0.2,
            "max_new_tokens": 40, "eval_samples": 4, "eval_every": 5, "progress": False}  # chapter 5's base_config
ROW_KEYS = ("step", "proxy_reward", "gold_reward", "kl", "response_length", "eval_proxy_reward", "eval_gold_reward",
            "eval_kl", "eval_response_length", "eval_terminated")


def n_words(responses) -> torch.Tensor:
    """Length of each reply in words (whitespace-separated), as floats; (B,)."""
    return torch.tensor([float(len(y.split())) for y in responses])


def verbose_rater(prompts, responses, terminated=None) -> torch.Tensor:
    """A biased annotator's reward: gold + BONUS per word; (B,)."""
    return gold_reward_fn(prompts, responses, terminated) + BONUS * n_words(responses)


def corr(a, b) -> float:
    return torch.corrcoef(torch.stack([torch.as_tensor(a).float(), torch.as_tensor(b).float()]))[0, 1].item()


def r4(x) -> float:
    return round(float(x), 4)


def chosen_longer(pairs) -> float:
    """Share of the pairs (replies of unequal length in words) whose chosen reply is the longer one."""
    diff = [len(r["chosen"].split()) - len(r["rejected"].split()) for r in pairs]
    return sum(d > 0 for d in diff) / sum(d != 0 for d in diff)


def test_metrics(rm, tok, records) -> dict:
    """evaluate_preferences, plus the accuracy vs gold on pairs whose gold-better reply is the longer / shorter one."""
    out = {k: r4(v) for k, v in evaluate_preferences(rm, tok, records).items()}
    rc, rr = score_pairs(rm, tok, records)
    gc, gr = (torch.tensor([r[f"{side}_gold"] for r in records]) for side in ("chosen", "rejected"))
    lc, lr = (n_words([r[side] for r in records]) for side in ("chosen", "rejected"))
    right, keep, longer = (rc - rr) * (gc - gr) > 0, (gc != gr) & (lc != lr), (gc > gr) == (lc > lr)
    out["gold_accuracy_better_longer"] = r4(right[keep & longer].float().mean())
    out["gold_accuracy_better_shorter"] = r4(right[keep & ~longer].float().mean())
    return out


class Sweep(Results):
    def run(self, run: str, seed: int) -> None:
        t0 = time.time()
        lm, tok = load_base_model("cpu", progress=False)
        book_rm, _ = load_reward_model("cpu", progress=False)
        book_fn = reward_fn_from_model(book_rm, tok)
        data = load_preference_data("cpu", progress=False)
        train_prompts = sorted({r["prompt"] for r in data["train"]})
        _, held_out = prompt_split(0)
        held = [p["prompt"] for p in held_out]
        ref = generate(lm, tok, held * REF_REPEATS, max_new_tokens=MAX_NEW_TOKENS,
                       generator=torch.Generator().manual_seed(REF_SEED))
        words = n_words(ref.responses)
        gold = gold_reward_fn(ref.prompts, ref.responses, ref.terminated)
        out = {"pairs": {}, "test": {}, "corr_length": {"gold": r4(corr(gold, words))}, "corr_gold": {}}
        out["corr_length"]["book"] = r4(corr(book_fn(ref.prompts, ref.responses, ref.terminated), words))
        out["test"]["book"] = test_metrics(book_rm, tok, data["test"])
        fns, replies = {}, {}
        for arm, rater in (("fair", gold_reward_fn), ("verbose", verbose_rater)):
            pairs = generate_preferences(lm, tok, train_prompts, N_PAIRS, Annotator(rater, 0.25, seed=seed),
                                         gold_fn=gold_reward_fn, seed=seed, progress=False, **SAMPLING)
            replies[arm] = [{r["chosen"], r["rejected"]} for r in pairs]
            agree = [r["chosen_gold"] > r["rejected_gold"] for r in pairs if r["chosen_gold"] != r["rejected_gold"]]
            out["pairs"][arm] = {"n": len(pairs), "label_gold_agreement": r4(sum(agree) / len(agree)),
                                 "chosen_longer": r4(chosen_longer(pairs))}
            rlhf_book.set_seed(seed)
            rm = reward_model_from_lm(lm)
            train_reward_model(rm, tok, pairs, **RM, seed=seed, progress=False)
            normalize_reward_model(rm, tok, ref.prompts, ref.responses, ref.terminated)
            fns[arm] = reward_fn_from_model(rm, tok)
            scores = fns[arm](ref.prompts, ref.responses, ref.terminated)
            out["corr_length"][arm], out["corr_gold"][arm] = r4(corr(scores, words)), r4(corr(scores, gold))
            out["test"][arm] = test_metrics(rm, tok, data["test"])
        assert replies["fair"] == replies["verbose"], "the two labellings must be of the same pairs of replies"
        bon = oo.best_of_n(lm, tok, held, BON_N, fns["verbose"], max_new_tokens=MAX_NEW_TOKENS, seed=BON_SEED + seed)
        lengths = torch.stack([n_words(row) for row in bon.responses])
        scorers = {"verbose": bon.scores, "fair": bon.score(fns["fair"]), "book": bon.score(book_fn),
                   "gold": bon.score(gold_reward_fn)}
        out["bon"] = {"random": {"words": r4(lengths.mean()), "gold": r4(scorers["gold"].mean())}}
        for name, s in scorers.items():
            pick = s.argmax(1, keepdim=True)
            out["bon"][name] = {"words": r4(lengths.gather(1, pick).mean()),
                                "gold": r4(scorers["gold"].gather(1, pick).mean())}
        fns["book"] = book_fn
        out["ppo_base"] = final_eval(lm, tok, fns, seed)
        out["ppo"] = {arm: self.ppo(run, arm, fns, seed) for arm in ("fair", "verbose", "book")}
        self.record(run, t0, seed=seed, bonus=BONUS, n_pairs=N_PAIRS, rm=RM, bon_n=BON_N, beta=BETA,
                    iterations=PPO_ITERATIONS, **out)

    def ppo(self, run: str, arm: str, fns: dict, seed: int) -> dict:
        """PPO against reward model ``arm``; its history and a final held-out evaluation scored by every reward."""
        train_prompts, held_out = prompt_split(0)
        policy, tok = load_base_model("cpu", progress=False)
        ref_lm, _ = load_base_model("cpu", progress=False)
        trainer = PPOTrainer(policy, ref_lm, tok, fns[arm], PPOConfig(**PPO_BASE, kl_coef=BETA, seed=seed),
                             gold_fn=gold_reward_fn)
        history = trainer.train(train_prompts, PPO_ITERATIONS, checkpoint_dir=self.scratch(run) / f"ppo_{arm}",
                                eval_prompts=held_out * EVAL_REPEATS)
        return {"history": compact(history, ROW_KEYS, samples=False), "final": final_eval(trainer.lm, tok, fns, seed)}


def final_eval(policy, tok, fns: dict, seed: int) -> dict:
    """FINAL_REPEATS replies of ``policy`` per held-out prompt: mean words, terminated, gold and every reward model."""
    held = [p["prompt"] for p in prompt_split(0)[1]] * FINAL_REPEATS
    ro = generate(policy, tok, held, max_new_tokens=PPO_BASE["max_new_tokens"],
                  generator=torch.Generator().manual_seed(1000 + seed))
    out = {"words": r4(n_words(ro.responses).mean()), "terminated": r4(ro.terminated.float().mean()),
           "gold": r4(gold_reward_fn(ro.prompts, ro.responses, ro.terminated).mean())}
    out.update({name: r4(fn(ro.prompts, ro.responses, ro.terminated).mean()) for name, fn in fns.items()})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(args.out)
    for seed in args.seeds:
        if f"seed={seed}" not in sweep.done:
            sweep.run(f"seed={seed}", seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
