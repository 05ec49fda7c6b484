"""CPU experiment: does PPO's first-minibatch forward reuse pay on the book's own recipe?

    # the trick was removed in the experience-step refactor (it did not pay): measure it on the library before
    PYTHONPATH=benchmarks/.work/rev-96a770f python benchmarks/run_cpu_reuse_book_recipe.py   # ~2 min on 2 cores

(``python benchmarks/run_cpu_ppo_vs_trl.py --before 96a770f`` unpacks that tree.) The result it
recorded, ``results/cpu_reuse_book_recipe.md``, is why the trick was removed.

``PPOTrainer.step`` forwards the first minibatch at theta_old once and uses that forward
twice: for V_old of its rows and, with its graph kept, for the first update. The other
rows get a no-grad forward. Without the trick (what ``disable_dropout=False`` does; the
book's base LM has dropout 0, so nothing else changes) V_old of every row comes from one
no-grad forward. The speed issue measured the trick on the TRL-matched setup (1 epoch, 1
minibatch: it saves one of two forwards); the code review asked what it is worth on the
recipe chapter 5 runs (batch 32, 2 minibatches x 4 epochs, 40 new tokens, value head on
the policy, the cpu reward model), where it saves a 16-row no-grad forward out of 8
training forwards and backwards.

In-process A/B on identical weights, alternating which goes first; each pair sees the
same machine load. Also checks that both give the same statistics (the trick is exact).
Writes benchmarks/results/cpu_reuse_book_recipe.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import rlhf_book  # noqa: E402  (before torch)

RECIPE = dict(batch_size=32, minibatch_size=16, ppo_epochs=4, lr=1e-4, clip_range=0.2, max_new_tokens=40,
              kl_coef=0.1, progress=False, seed=0)  # chapter 5's base_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_reuse_book_recipe.json"))
    args = ap.parse_args()
    import torch

    from rlhf_book.corpus import prompt_split
    from rlhf_book.ppo import PPOConfig, PPOTrainer
    from rlhf_book.reward_model import load_reward_model, reward_fn_from_model

    if not hasattr(PPOTrainer, "_prepare"):
        sys.exit("this rlhf_book has no first-minibatch reuse any more: run it with PYTHONPATH=<a tree before the "
                 "experience-step refactor>, e.g. benchmarks/.work/rev-96a770f (see the docstring)")

    load_start, t0 = common.loadavg(), time.perf_counter()
    threads = rlhf_book.configure_threads()
    rlhf_book.set_seed(0)
    lm, tok = rlhf_book.load_base_model("cpu", device="cpu", progress=False)
    rm, rm_tok = load_reward_model("cpu", device="cpu", progress=False)
    reward_fn = reward_fn_from_model(rm, rm_tok)
    train, _ = prompt_split(0)
    texts = [p["prompt"] for p in train]

    def trainer(reuse: bool) -> PPOTrainer:
        cfg = PPOConfig(**RECIPE, disable_dropout=reuse)
        return PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, reward_fn, cfg, gold_fn=None)

    sides = {"reuse": trainer(True), "no_reuse": trainer(False)}
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    stats = {k: [] for k in sides}
    g = torch.Generator().manual_seed(1)
    for it in range(args.warmup + args.iters):
        batch = [texts[i] for i in torch.randperm(len(texts), generator=g)[: RECIPE["batch_size"]].tolist()]
        order = list(sides.items()) if it % 2 == 0 else list(sides.items())[::-1]
        for name, tr in order:
            w, c = time.perf_counter(), time.process_time()
            s = tr.step(batch)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
            stats[name].append({k: s[k] for k in ("proxy_reward", "kl", "policy_loss", "value_loss", "first_ratio_mean")})
    w = args.warmup
    med = {k: {"wall": round(common.median(wall[k][w:]), 4), "cpu": round(common.median(cpu[k][w:]), 4)} for k in sides}
    pairwise = [a / b for a, b in zip(wall["reuse"][w:], wall["no_reuse"][w:])]
    max_diff = max(abs(a[k] - b[k]) for a, b in zip(stats["reuse"], stats["no_reuse"]) for k in a)
    res = {
        **common.run_header("cpu_reuse_book_recipe", load_start, t0),
        "recipe": RECIPE, "threads": threads, "warmup": w, "measured": args.iters,
        "wall_seconds": wall, "cpu_seconds": cpu, "median": med,
        "ratio_reuse_over_no_reuse_wall": round(med["reuse"]["wall"] / med["no_reuse"]["wall"], 3),
        "ratio_reuse_over_no_reuse_cpu": round(med["reuse"]["cpu"] / med["no_reuse"]["cpu"], 3),
        "median_pairwise_ratio_wall": round(common.median(pairwise), 3),
        "max_abs_stat_difference": max_diff,
        "loadavg_end": common.loadavg(),
    }
    out = Path(args.out)
    common.write_json(out, res)
    md = [
        "# PPO first-minibatch forward reuse on the book's recipe (CPU)", "",
        f"`{res.get('command', 'python benchmarks/run_cpu_reuse_book_recipe.py')}` on {res['date']}, "
        f"{res['machine']['nproc']} cores ({res['machine']['cpu_model']}), {threads} threads, "
        f"load {load_start} -> {res['loadavg_end']}.", "",
        f"Recipe (chapter 5): `{RECIPE}`; cpu base LM, value head on the policy, the cpu reward model. "
        f"In-process A/B, {args.iters} measured iterations each after {w} warm-up, alternating order.", "",
        "| variant | median wall s/iter | median CPU s/iter |", "|---|---|---|",
        f"| reuse (stock) | {med['reuse']['wall']} | {med['reuse']['cpu']} |",
        f"| no reuse | {med['no_reuse']['wall']} | {med['no_reuse']['cpu']} |", "",
        f"reuse / no reuse: wall {res['ratio_reuse_over_no_reuse_wall']}, CPU {res['ratio_reuse_over_no_reuse_cpu']}, "
        f"median of the per-pair wall ratios {res['median_pairwise_ratio_wall']} "
        f"(per-pair: {', '.join(f'{x:.3f}' for x in pairwise)}).", "",
        f"Largest difference between the two sides' logged statistics: {max_diff:.2e} (the trick is exact).", "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
