"""Worker: one GRPO (or PPO) implementation at a real small-LM shape; writes one JSON.

``--side ours`` runs ``rlhf_book`` (the main Python), ``--side trl`` TRL 1.16's ``GRPOTrainer``
(benchmarks/.venv-trl116). The model is the orchestrator's random-init Qwen3-style checkpoint
(vocab 151,936, hidden 512, 4 layers, tied embeddings, fp32), the same file for policy and
reference on both sides; the prompts are the shared 64 corpus prompts, 8 an iteration in order,
K = 4 replies each (32 sequences), 128 new tokens, temperature 1, beta = 0.04 (so the reference
forward runs), one optimizer step per iteration, lr 1e-6, clip 1.0, dropout off, no gradient
checkpointing. The reward is the same cheap function of the text on both sides (the benchmark
measures the trainers, not a reward model).

Measured per iteration: wall and CPU seconds; per run: peak RSS (``ru_maxrss``) and the RSS right
after the models are loaded (so the training's own peak is ``peak - loaded``); ours also the phase
split of ``trainer.timings``. ``--dump PATH`` writes each iteration's prompt ids and response shapes
for the orchestrator's identical-setup check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

os.environ.update(common.THREAD_ENV)  # before torch loads

SHAPE = {"prompts_per_iter": 8, "num_generations": 4, "response_length": 128, "kl_coef": 0.04, "lr": 1e-6,
         "temperature": 1.0, "seed": 0}


def text_reward(prompts, completions, **kwargs) -> list[float]:
    """A cheap reward of the text, identical on both sides: characters in the reply / 100."""
    return [len(c) / 100.0 for c in completions]


def run_ours(args, tok, prompts, art: Path) -> dict:
    import rlhf_book  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer
    from rlhf_book.ppo import PPOConfig, PPOTrainer
    from rlhf_book.tokenizer import format_prompt

    policy = AutoModelForCausalLM.from_pretrained(art / "model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(art / "model", dtype=torch.float32)
    loaded = common.current_rss_mib()
    S = SHAPE
    n_rows = S["prompts_per_iter"] * S["num_generations"]
    extra = json.loads(args.ours_config) if args.ours_config else {}

    def reward_fn(p, r, t):
        return text_reward(p, r)

    common_cfg = dict(max_new_tokens=S["response_length"], temperature=S["temperature"], kl_coef=S["kl_coef"],
                      lr=S["lr"], seed=S["seed"], progress=False, missing_eos_score=None, eval_every=0, **extra)
    if args.algo == "grpo":
        cfg = CriticFreeConfig(advantage="grpo", num_generations=S["num_generations"],
                               batch_size=S["prompts_per_iter"], loss_type="dapo", kl_penalty="loss", **common_cfg)
        trainer = CriticFreeTrainer(policy, ref, tok, reward_fn, cfg)
        step_prompts = lambda i: [prompts[(i * S["prompts_per_iter"] + j) % len(prompts)]  # noqa: E731
                                  for j in range(S["prompts_per_iter"])]
    else:  # PPO at the same shape: 32 prompts, one reply each, a value head, one epoch of one minibatch
        cfg = PPOConfig(batch_size=n_rows, minibatch_size=n_rows, ppo_epochs=1, **common_cfg)
        trainer = PPOTrainer(policy, ref, tok, reward_fn, cfg)
        step_prompts = lambda i: [prompts[(i * n_rows + j) % len(prompts)] for j in range(n_rows)]  # noqa: E731
    times, cpu, phases, dump = [], [], [], []
    for i in range(args.warmup + args.iters):
        t, c = time.perf_counter(), time.process_time()
        trainer.step(step_prompts(i))
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        phases.append({k: round(v, 4) for k, v in trainer.timings.items()})
        ro = trainer.experience.rollout
        dump.append({"prompt_ids": [tok(format_prompt(p, tok))["input_ids"] for p in ro.prompts[:: S["num_generations"]]]
                     if args.algo == "grpo" else None,
                     "sequences": len(ro), "response_columns": int(ro.response_ids.size(1)),
                     "terminated": float(ro.terminated.float().mean())})
    return {"times": times, "cpu": cpu, "phases": phases, "dump": dump, "loaded_rss_mib": round(loaded, 1),
            "config": {k: v for k, v in cfg.__dict__.items() if isinstance(v, (int, float, str, type(None)))},
            "versions": {"torch": torch.__version__, "rlhf_book": rlhf_book.__version__}}


def run_trl(args, tok, prompts, art: Path) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    S = SHAPE
    policy = AutoModelForCausalLM.from_pretrained(art / "model", dtype=torch.float32)
    n = args.warmup + args.iters
    ds = Dataset.from_dict({"prompt": [p + "\n" for p in prompts]})  # format_prompt(p), as on our side
    cfg = GRPOConfig(
        output_dir=str(common.WORK / "trl_real_shape"), per_device_train_batch_size=S["prompts_per_iter"] * S["num_generations"],
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=S["num_generations"],
        max_completion_length=S["response_length"], temperature=S["temperature"], top_k=0, top_p=1.0, beta=S["kl_coef"],
        learning_rate=S["lr"], max_steps=n, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        seed=S["seed"], report_to=[], logging_steps=10_000, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, disable_dropout=True, shuffle_dataset=False)
    stamps, cpu_stamps, dump = [], [], []
    orig_generate = policy.generate

    def generate(*a, **k):
        out = orig_generate(*a, **k)
        seq = out.sequences if hasattr(out, "sequences") else out
        inp = k.get("input_ids", a[0] if a else None)
        mask = k.get("attention_mask")
        P = inp.shape[1]
        comp = seq[:, P:]
        dump.append({"prompt_ids": [row[m.bool()].tolist() for row, m in zip(inp, mask)][:: S["num_generations"]],
                     "sequences": int(seq.shape[0]), "response_columns": int(comp.shape[1]),
                     "terminated": float((comp == tok.eos_token_id).any(1).float().mean())})
        return out

    policy.generate = generate

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    trainer = GRPOTrainer(model=policy, reward_funcs=text_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    loaded = common.current_rss_mib()
    trainer.train()
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:])]
    return {"times": times, "cpu": cpu, "phases": [], "dump": dump, "loaded_rss_mib": round(loaded, 1),
            "config": {k: getattr(cfg, k) for k in ("per_device_train_batch_size", "num_generations", "loss_type",
                                                    "beta", "max_completion_length", "scale_rewards")},
            "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__}}


def main() -> None:
    ap = argparse.ArgumentParser()
    common.worker_args(ap)
    ap.add_argument("--side", choices=["ours", "trl"], required=True)
    ap.add_argument("--algo", choices=["grpo", "ppo"], default="grpo")
    ap.add_argument("--ours-config", default=None, help="JSON of extra config fields for ours (e.g. memory knobs)")
    ap.add_argument("--response-length", type=int, default=SHAPE["response_length"])
    args = ap.parse_args()
    SHAPE["response_length"] = args.response_length
    load_start, t0 = common.loadavg(), time.perf_counter()
    import torch

    torch.set_num_threads(common.SETUP["threads"])
    art = Path(args.artifacts)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    res = (run_ours if args.side == "ours" else run_trl)(args, tok, prompts, art)
    tokens = SHAPE["prompts_per_iter"] * SHAPE["num_generations"] * SHAPE["response_length"]  # 32 rows either way
    out = {"side": args.side, "algo": args.algo, "shape": SHAPE, **common.summarize(res["times"], args.warmup, None,
                                                                                    res["cpu"]),
           "tokens_per_iter": tokens, "loaded_rss_mib": res["loaded_rss_mib"], "config": res["config"],
           "versions": res["versions"], "phases": res["phases"], "dump": res["dump"],
           **common.worker_footer(time.perf_counter() - t0, load_start)}
    common.write_json(Path(args.out), out)


if __name__ == "__main__":
    main()
