"""Worker: ``rlhf_book.ppo.PPOTrainer`` on the shared setup; writes one JSON.

Runs in the main Python (rlhf_book installed editable). One iteration = one
``PPOTrainer.step(prompts)`` on 16 prompts (the 64 prompts in 4 fixed chunks, cycled).
The reward is the shared random-init GPT2ForSequenceClassification, wrapped as a
``reward_fn(prompts, responses, terminated)`` (it re-tokenizes the decoded text: that is
our API, and its cost is ours). ``--critic separate`` (default, like-for-like with TRL's
``value_model``) passes ``ValueModel.from_reward_model(<the shared value model>)``;
``--critic head`` uses the book's default (critic=None: a value head on the policy).

Phase times come from the trainer's own ``timings`` (``OnPolicyTrainer.timings``, filled
by every ``step``): generation, the experience step (critic + reference forwards and GAE,
with the reward function's share reported apart) and the rest of ``step`` (the PPO update
and statistics). ``trainer.experience`` gives the iteration's rollout for the token counts.
Workers of older library versions (``run_cpu_ppo_vs_trl.py --before REV``) time the same
phases with wrappers of their own.

``--device cuda --precision bf16`` (benchmarks/run_gpu.py) moves every model to the GPU and
sets ``PPOConfig.precision``; the reward forward runs under the same autocast. On CUDA each
clock read is preceded by ``torch.cuda.synchronize()`` (kernels run asynchronously) and the
result adds the peak GPU memory. The defaults (cpu, fp32) are the CPU benchmark unchanged.
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


def make_reward_fn(reward_model, tokenizer, precision: str = "fp32"):
    """reward_fn(prompts, responses, terminated) -> (B,) from a sequence-classification model's last-token score.

    The forward runs on the reward model's device, under bf16 autocast when ``precision`` is bf16.
    """
    import torch

    from rlhf_book.rollout import position_ids_from_mask
    from rlhf_book.runtime import autocast
    from rlhf_book.tokenizer import format_prompt

    eos = tokenizer.eos_token
    device = next(reward_model.parameters()).device

    @torch.no_grad()
    def reward_fn(prompts, responses, terminated=None):
        if terminated is None:
            term = [True] * len(prompts)
        else:  # one device-to-host copy, not one per element
            term = [bool(t) for t in (terminated.tolist() if hasattr(terminated, "tolist") else terminated)]
        texts = [format_prompt(p) + r + (eos if t else "") for p, r, t in zip(prompts, responses, term)]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        tokenizer.padding_side = side
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        with autocast(device, precision):
            out = reward_model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        return out.logits[:, 0].float()

    return reward_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    common.worker_args(ap)
    ap.add_argument("--response-length", type=int, default=common.SETUP["response_length"])
    ap.add_argument("--batch-size", type=int, default=common.SETUP["batch_size"])
    ap.add_argument("--critic", choices=["separate", "head"], default="separate")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the measured iterations here")
    ap.add_argument("--device", default="cpu", help="cpu (the CPU benchmark) or cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="PPOConfig.precision")
    ap.add_argument("--compile", action="store_true", help="PPOConfig.compile: torch.compile the teacher-forced forwards")
    ap.add_argument("--generation-threads", type=int, default=None,
                    help="PPOConfig.generation_threads (0: None, i.e. the process setting); default: the library's")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import torch
    import transformers
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    import rlhf_book.ppo as ppo_mod
    import rlhf_book.trainer as trainer_mod
    from rlhf_book.critic import ValueModel
    from rlhf_book.ppo import PPOConfig, PPOTrainer

    S = common.SETUP
    rlhf_book.configure_threads(S["threads"])
    rlhf_book.set_seed(S["seed"])
    art = Path(args.artifacts)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    ref = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32).eval().requires_grad_(False)
    critic = None
    if args.critic == "separate":
        critic = ValueModel.from_reward_model(GPT2ForSequenceClassification.from_pretrained(art / "value", dtype=torch.float32))
    for m in (policy, ref, reward, critic):  # PPOTrainer runs on the device of the policy's parameters
        if m is not None:
            m.to(args.device)

    cfg = PPOConfig(
        batch_size=args.batch_size, minibatch_size=args.batch_size, ppo_epochs=S["ppo_epochs"],
        max_new_tokens=args.response_length, temperature=S["temperature"], lr=S["lr"], kl_coef=S["kl_coef"],
        missing_eos_score=None,  # TRL: missing_eos_penalty=None
        seed=S["seed"], progress=False, precision=args.precision, compile=args.compile,
        **({} if args.generation_threads is None else {"generation_threads": args.generation_threads or None}),
    )
    reward_fn = make_reward_fn(reward, tok, args.precision)
    clock = common.make_clock(args.device)
    trainer = PPOTrainer(policy, ref, tok, reward_fn, cfg, critic=critic, gold_fn=None)
    setup_s = time.perf_counter() - t_start

    chunks = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    times, cpu, tokens, real, phases, train_tokens, max_id = [], [], [], [], [], [], []
    prof = None
    for it in range(args.warmup + args.iters):
        if args.profile and it == args.warmup:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        t, c = clock(), time.process_time()
        stats = trainer.step(chunks[it % len(chunks)])
        dt = clock() - t
        cpu.append(time.process_time() - c)
        ro, phase = trainer.experience.rollout, trainer.timings
        times.append(dt)
        tokens.append(int(ro.response_ids.numel()))
        real.append(int(ro.response_mask.sum()))
        # tokens trained: every (prompt + response) column of every sequence, once per PPO epoch
        train_tokens.append(len(ro) * (ro.prompt_ids.shape[1] + ro.response_ids.shape[1]) * cfg.ppo_epochs)
        max_id.append(int(ro.response_ids.max()))
        phases.append({"generate": phase["generate"], "critic_ref_forwards_gae": phase["experience"] - phase["reward"],
                       "reward_fn": phase["reward"],
                       "update_and_stats": dt - phase["generate"] - phase["experience"]})
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(args.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    meas = phases[args.warmup:]
    phase_median = {k: round(common.median([p[k] for p in meas]), 4) for k in meas[0]}
    res = {
        "impl": "ours_ppo" if args.critic == "separate" else "ours_ppo_value_head",
        "label": "rlhf_book PPOTrainer" + (" (separate critic)" if args.critic == "separate" else " (value head on policy, critic=None)"),
        "versions": {"rlhf_book": rlhf_book.__version__,
                     "rlhf_book_ppo_sha1": __import__("hashlib").sha1(
                         Path(ppo_mod.__file__).read_bytes() + Path(trainer_mod.__file__).read_bytes()).hexdigest()[:12],
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": trainer.precision,
        "compile": args.compile,
        "config": {"batch_size": args.batch_size, "response_length": args.response_length,
                   "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd, "n_head": policy.config.n_head,
                   "vocab_size": policy.config.vocab_size, "ppo_epochs": cfg.ppo_epochs,
                   "critic": "ValueModel.from_reward_model(value GPT2ForSequenceClassification)" if critic is not None
                   else "PolicyWithValueHead (detached value head)", "gold_fn": None},
        **common.summarize(times, args.warmup, tokens, cpu),
        "generation_s_median": phase_median["generate"],
        "phase_s_median": phase_median,
        "real_tokens_per_iter": round(sum(real[args.warmup:]) / len(real[args.warmup:]), 1),
        # per iteration, warm-up included (run_gpu.py computes tokens/s and MFU from these)
        "per_iter": {"generation_s": [round(p["generate"], 4) for p in phases],
                     "update_s": [round(p["update_and_stats"], 4) for p in phases],
                     "generated_tokens": tokens, "train_tokens": train_tokens},
        "max_sampled_id": max(max_id),
        **common.gpu_memory(args.device),
        "last_stats": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()},
        **common.worker_footer(setup_s, load_start),
    }
    common.write_json(Path(args.out), res)
    print(f"{res['impl']}: {res['median_s_per_iter']} s/iter, {res.get('generated_tokens_per_s')} tok/s, "
          f"peak RSS {res['peak_rss_mib']} MiB, phases {phase_median}")


if __name__ == "__main__":
    main()
