"""Worker: in-process A/B of one rlhf_book PPO change, alternating iterations (A, B, A, B, ...).

On a shared machine the load drifts by 2x within minutes, so two separate runs cannot
resolve a 10% effect. Here two PPOTrainers on identical weights live in one process and
take turns; each pair sees the same load. Variants (B; A is always the stock setup):

  fused_gelu   every model built with activation_function="gelu_pytorch_tanh" (the same
               tanh-approximated GELU as GPT-2's default "gelu_new", as one fused kernel)
  value_head   critic=None (the book's default: a value head on the policy) instead of a
               separate critic

Writes one JSON with both sides' wall and CPU seconds per iteration and the B/A ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.update(common.THREAD_ENV)
import rlhf_book  # noqa: E402  (before torch)


def build(art: Path, activation: str | None, critic_kind: str):
    import torch
    from ours_ppo import make_reward_fn
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    from rlhf_book.critic import ValueModel
    from rlhf_book.ppo import PPOConfig, PPOTrainer

    S = common.SETUP
    mk = {"activation_function": activation} if activation else {}
    tok, _ = common.load_tokenizer_and_prompts(art)
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32, **mk)
    ref = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32, **mk)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32, **mk).eval().requires_grad_(False)
    critic = None
    if critic_kind == "separate":
        critic = ValueModel.from_reward_model(GPT2ForSequenceClassification.from_pretrained(art / "value", dtype=torch.float32, **mk))
    cfg = PPOConfig(batch_size=S["batch_size"], minibatch_size=S["batch_size"], ppo_epochs=S["ppo_epochs"],
                    max_new_tokens=S["response_length"], temperature=S["temperature"], lr=S["lr"], kl_coef=S["kl_coef"],
                    missing_eos_score=None, seed=S["seed"], progress=False)
    return PPOTrainer(policy, ref, tok, make_reward_fn(reward, tok), cfg, critic=critic, gold_fn=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", choices=["fused_gelu", "value_head"], required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    S = common.SETUP
    rlhf_book.configure_threads(S["threads"])
    rlhf_book.set_seed(S["seed"])
    art = Path(args.artifacts)
    load_start = common.loadavg()
    a = build(art, None, "separate")
    b = build(art, "gelu_pytorch_tanh", "separate") if args.variant == "fused_gelu" else build(art, None, "head")
    prompts = common.load_prompts(art)
    chunks = [prompts[i : i + S["batch_size"]] for i in range(0, len(prompts), S["batch_size"])]
    wall = {"A": [], "B": []}
    cpu = {"A": [], "B": []}
    for it in range(args.warmup + args.iters):
        order = (("A", a), ("B", b)) if it % 2 == 0 else (("B", b), ("A", a))  # alternate who goes first
        for name, tr in order:
            t, c = time.perf_counter(), time.process_time()
            tr.step(chunks[it % len(chunks)])
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    w = args.warmup
    med = {k: {"wall": round(common.median(wall[k][w:]), 4), "cpu": round(common.median(cpu[k][w:]), 4)} for k in wall}
    pair_ratio = [bw / aw for aw, bw in zip(wall["A"][w:], wall["B"][w:])]
    res = {
        "impl": "ours_ab", "variant": args.variant,
        "A": "stock (gelu_new, separate critic)",
        "B": "activation_function=gelu_pytorch_tanh" if args.variant == "fused_gelu" else "critic=None (value head)",
        "threads": torch.get_num_threads(), "warmup": w, "measured": args.iters,
        "wall_seconds": wall, "cpu_seconds": cpu, "median": med,
        "ratio_B_over_A_wall": round(med["B"]["wall"] / med["A"]["wall"], 3),
        "ratio_B_over_A_cpu": round(med["B"]["cpu"] / med["A"]["cpu"], 3),
        "median_pairwise_ratio_wall": round(common.median(pair_ratio), 3),
        "loadavg_start": load_start, "loadavg_end": common.loadavg(),
    }
    common.write_json(Path(args.out), res)
    print(f"A/B {args.variant}: A {med['A']} B {med['B']} B/A wall {res['ratio_B_over_A_wall']} "
          f"cpu {res['ratio_B_over_A_cpu']} pairwise {res['median_pairwise_ratio_wall']}")


if __name__ == "__main__":
    main()
