"""Chapter 1's SFT baseline over seeds: one epoch of supervised fine-tuning on the chosen replies of chapter 2's pairs.

    python tools/sweep_ch01.py            # 3 seeds, ~3 min on 2 CPU cores (cached models and pairs)

Writes one JSON line per finished run to ``data/results/ch01_sft.jsonl`` (the chapter reads it); resumable
like the other sweeps (:mod:`sweep_common`). Each run is the chapter's live run with another seed:
``DPOTrainer`` with ``loss_type="sft"``, lr 1e-4, 32 pairs a step, one epoch over the 2,999 training pairs,
evaluated on the 30 held-out prompts x 4 (gold reward, KL to the base model) every 20 steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import rlhf_book  # noqa: F401  (first: OMP_WAIT_POLICY before torch)

from rlhf_book import gold_reward_fn, load_base_model, prompt_split
from rlhf_book.dpo import DPOConfig, DPOTrainer
from rlhf_book.preferences import load_preference_data
from rlhf_book.runtime import configure_threads
from sweep_common import Results

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results" / "ch01_sft.jsonl"
SEEDS = (0, 1, 2)
EVAL_KEYS = ("step", "eval_gold_reward", "eval_kl", "eval_response_length", "eval_terminated")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    args = parser.parse_args(argv)
    configure_threads()
    results = Results(RESULTS)
    pairs = load_preference_data("cpu", progress=False)["train"]
    _, eval_prompts = prompt_split()
    for seed in args.seeds:
        run = f"sft-seed{seed}"
        if run in results.done:
            continue
        t0 = time.time()
        policy, tok = load_base_model("cpu", progress=False)
        ref, _ = load_base_model("cpu", progress=False)
        cfg = DPOConfig(loss_type="sft", lr=1e-4, batch_size=32, seed=seed, eval_every=20, progress=False)
        history = DPOTrainer(policy, ref, tok, cfg, gold_fn=gold_reward_fn).train(
            pairs, epochs=1, eval_prompts=eval_prompts * 4, checkpoint_dir=results.scratch(run))
        evals = [{k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in EVAL_KEYS}
                 for r in history if "eval_gold_reward" in r]
        results.record(run, t0, seed=seed, eval=evals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
