"""Worker: ``rlhf_book.critic_free.CriticFreeTrainer`` (GRPO or RLOO) on the shared setup; writes one JSON.

Runs in the main Python (rlhf_book installed editable). The same weights, tokenizer, prompts
and reward model as the PPO comparison, configured to do per iteration what TRL 1.16's
``GRPOTrainer`` / ``RLOOTrainer`` do in ``workers/trl_grpo_rloo.py``: 4 prompts x K = 4 samples
= 16 sequences, 24 new tokens, temperature 1, ``kl_coef`` = TRL's ``beta`` = ``SETUP["kl_coef"]``
(so the reference forward runs), one pass (``num_iterations=1``) of one minibatch (all 16), i.e.
one optimizer step per iteration, lr ``SETUP["lr"]``, dropout off, fp32. One iteration is one
``CriticFreeTrainer.step(prompts)`` on 4 prompts: the 64 prompts in 16 fixed chunks of 4, in
order and cycled, which is the order TRL's sampler gives with ``shuffle_dataset=False``.

Per algorithm, TRL's defaults (``trl/trainer/grpo_config.py``, ``rloo_config.py`` and the two
trainers' ``_compute_loss``), mirrored here:

* ``--algo grpo``: ``advantage="grpo"``, ``scale_rewards="group"``, ``loss_type="dapo"``
  (TRL's default), ``kl_penalty="loss"`` (beta * k3 per token in the loss, aggregated like
  the policy term), epsilon 0.2;
* ``--algo rloo``: ``advantage="rloo"``, ``kl_penalty="reward"`` (r - beta * sum_t k1, TRL's
  RLOO), ``whiten_advantages=False`` (TRL's ``normalize_advantages=False``), epsilon 0.2.
  TRL's RLOO loss takes the ratio of *summed* log-probs per reply and averages over replies;
  ours has only token-level ratios, and ``loss_type="dr_grpo"`` is its on-policy gradient up
  to the constant 1 / max_new_tokens (same work: one forward and backward of the 16 rows).

Both: ``missing_eos_score=None`` (TRL has no missing-EOS rule), the clip of the gradient norm
at 1.0 (both defaults). The reward is ``make_reward_fn`` of ``workers/ours_ppo.py`` (imported,
so both benchmarks score alike): the shared random-init GPT2ForSequenceClassification on the
re-tokenized prompt + reply text (+ EOS when the reply terminated).

Phase times come from the trainer's own ``timings`` (``OnPolicyTrainer.timings``, filled by
every ``step``): ``generate``; ``reward`` (the reward function); ``ref_forward`` (the
experience step's forwards: only the reference here, log pi_old is the sampler's); the rest
of the experience step (``experience_rest``: per-token KL, the group advantages); ``update``
(the policy's forward, backward, clip, Adam, the loss statistics); ``rest`` (the experience
statistics and the KL controller, read after the update). ``trainer.experience`` gives the
iteration's rollout for the token counts.

``--profile PATH`` writes a torch.profiler table (top ops by self CPU time) of the measured
iterations; ``--dump PATH`` writes each iteration's prompt token ids (unpadded, per row), the
response lengths and shapes, for the orchestrator's identical-setup checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

os.environ.update(common.THREAD_ENV)
from ours_ppo import make_reward_fn  # this folder is on sys.path; ours_ppo imports rlhf_book, before torch

import rlhf_book


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", choices=["grpo", "rloo"], required=True)
    common.worker_args(ap)
    ap.add_argument("--num-generations", type=int, default=4, help="K, samples per prompt")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the measured iterations here")
    ap.add_argument("--dump", default=None, help="write per-iteration prompt ids and response shapes here")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import torch
    import transformers
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    import rlhf_book.critic_free as cf_mod
    import rlhf_book.experience as exp_mod
    import rlhf_book.rollout as rollout_mod
    import rlhf_book.trainer as trainer_mod
    from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer

    S = common.SETUP
    B, R, K = S["batch_size"], S["response_length"], args.num_generations
    if B % K:
        raise SystemExit(f"{B} sequences per iteration are not groups of K={K}")
    n_prompts = B // K
    rlhf_book.configure_threads(S["threads"])
    rlhf_book.set_seed(S["seed"])
    art = Path(args.artifacts)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    ref = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32).eval().requires_grad_(False)

    algo = {
        "grpo": {"advantage": "grpo", "scale_rewards": "group", "loss_type": "dapo", "kl_penalty": "loss",
                 "use_bias_correction_kl": True},  # TRL 1.16's defaults
        "rloo": {"advantage": "rloo", "loss_type": "dr_grpo", "kl_penalty": "reward", "whiten_advantages": False},
    }[args.algo]
    cfg = CriticFreeConfig(
        batch_size=n_prompts, num_generations=K, max_new_tokens=R, temperature=S["temperature"], lr=S["lr"],
        kl_coef=S["kl_coef"], num_iterations=1, minibatch_size=None, epsilon=0.2, missing_eos_score=None,
        disable_dropout=True, precision="fp32", seed=S["seed"], progress=False, **algo,
    )
    trainer = CriticFreeTrainer(policy, ref, tok, make_reward_fn(reward, tok), cfg, gold_fn=None)
    setup_s = time.perf_counter() - t_start

    chunks = [prompts[i : i + n_prompts] for i in range(0, len(prompts), n_prompts)]
    times, cpu, tokens, real, phases, shapes, dump_iters = [], [], [], [], [], [], []
    prof = None
    for it in range(args.warmup + args.iters):
        if args.profile and it == args.warmup:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        t, c = time.perf_counter(), time.process_time()
        stats = trainer.step(chunks[it % len(chunks)])
        dt = time.perf_counter() - t
        cpu.append(time.process_time() - c)
        ro, ph = trainer.experience.rollout, trainer.timings
        times.append(dt)
        tokens.append(int(ro.response_ids.numel()))
        real.append(int(ro.response_mask.sum()))
        shapes.append({"sequences": len(ro), "prompt_columns": int(ro.prompt_ids.shape[1]),
                       "response_columns": int(ro.response_ids.shape[1])})
        phases.append({"generate": ph["generate"], "reward": ph["reward"], "ref_forward": ph["forwards"],
                       "experience_rest": ph["experience"] - ph["reward"] - ph["forwards"], "update": ph["update"],
                       "rest": dt - ph["generate"] - ph["experience"] - ph["update"]})
        if args.dump:
            dump_iters.append({
                "prompt_ids": [p[m.bool()].tolist() for p, m in zip(ro.prompt_ids, ro.prompt_mask)],
                "response_lengths": ro.response_mask.sum(-1).tolist(),
                "terminated": ro.terminated.tolist(), **shapes[-1]})
    if prof is not None:
        prof.__exit__(None, None, None)
        Path(args.profile).write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))

    meas = phases[args.warmup:]
    phase_median = {k: round(common.median([p[k] for p in meas]), 4) for k in meas[0]}
    lib_files = (cf_mod, trainer_mod, exp_mod, rollout_mod)
    res = {
        "impl": f"ours_{args.algo}",
        "label": f"rlhf_book CriticFreeTrainer ({trainer.name})",
        "versions": {"rlhf_book": rlhf_book.__version__,
                     "rlhf_book_critic_free_sha1": hashlib.sha1(b"".join(Path(m.__file__).read_bytes()
                                                                         for m in lib_files)).hexdigest()[:12],
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "config": {"sequences_per_iter": B, "prompts_per_iter": n_prompts, "num_generations": K,
                   "response_length": R, "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd,
                   "critic": "none", "prompt_order": "the 64 prompts in chunks of 4, in order, cycled",
                   "trainer_config": {k: v for k, v in dataclasses.asdict(cfg).items()
                                      if k not in ("eval_every", "eval_samples", "checkpoint_every", "progress")}},
        **common.summarize(times, args.warmup, tokens, cpu),
        "generation_s_median": phase_median["generate"],
        "phase_s_median": phase_median,
        "per_iter_phases": [{k: round(v, 5) for k, v in p.items()} for p in phases],
        "per_iter_shapes": shapes,
        "real_tokens_per_iter": round(sum(real[args.warmup:]) / len(real[args.warmup:]), 1),
        "last_stats": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in stats.items()},
        **common.worker_footer(setup_s, load_start),
    }
    if args.profile:
        res["profile_path"] = args.profile
    common.write_json(Path(args.out), res)
    if args.dump:
        common.write_json(Path(args.dump), {"impl": res["impl"], "iterations": dump_iters,
                                            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id})
    print(f"{res['impl']}: {res['median_s_per_iter']} s/iter, {res.get('generated_tokens_per_s')} tok/s, "
          f"peak RSS {res['peak_rss_mib']} MiB, phases {phase_median}")


if __name__ == "__main__":
    main()
