"""Worker: TRL 1.16 ``GRPOTrainer`` or ``RLOOTrainer`` on the shared setup; writes one JSON.

Runs in benchmarks/.venv-trl116. Same weights, tokenizer, prompts, reward model, 16 sequences
and 24 new tokens per iteration as the PPO comparison; 16 sequences = 4 prompts x 4 samples
(both algorithms need a group per prompt). One iteration = one optimizer step with
``steps_per_generation=1`` and ``num_iterations=1`` (generate 16, ref + reward forwards, one
policy update). ``beta`` = the PPO KL coefficient, so the reference forward is included. No
critic: these algorithms have none, so they are cheaper per iteration than PPO by design.
Everything else is TRL's default: GRPO ``loss_type="dapo"``, ``scale_rewards="group"``,
``use_bias_correction_kl=True`` (k3 times the ratio); RLOO's KL in the reward (k1 summed over
the reply), ``normalize_advantages=False``, its sequence-ratio loss; epsilon 0.2, AdamW
(``adamw_torch_fused``, weight decay 0, eps 1e-8), linear lr decay, gradient clip 1.0.

Used by ``run_cpu_ppo_vs_trl.py`` (context rows, TRL's shuffled prompt order) and
``run_cpu_grpo_rloo_vs_trl.py``, which passes ``--no-shuffle``: ``shuffle_dataset=False``, so
the sampler takes the 64 prompts in order, 4 a step, each repeated 4 times, which is the order
``workers/ours_critic_free.py`` feeds our trainer (the orchestrator checks the token ids).

Timing: a TrainerCallback stamps ``on_train_begin`` and every ``on_step_end``; an iteration is
the wall time between consecutive stamps. Phase split from thin wrappers on the trainer
instance (always on; each is one clock read around a call): ``generate`` (``policy.generate``,
which TRL calls on the unwrapped model), ``reward`` (``_calculate_rewards``: decode, tokenize
prompt + completion text, the reward model's forward), ``ref_forward`` and ``old_logp_forward``
(``_get_per_token_logps_and_entropies`` without grad on the reference / on the policy; RLOO
always recomputes log pi_old, GRPO not with one step per generation), ``experience_rest`` (the
rest of ``_generate_and_score_completions``: tokenizing the prompts, padding, advantages,
metrics), ``train_forward`` (the same function with grad: the policy forward with TRL's fused
LM head, log-probs and entropy), ``loss_rest`` (the rest of ``compute_loss``: the loss and its
metrics), ``backward`` (``accelerator.backward``), ``clip`` (``_clip_grad_norm``),
``optimizer`` (between ``on_pre_optimizer_step`` and ``on_optimizer_step``), ``rest`` (the
Trainer loop: flops estimate, lr scheduler, zero_grad, log/save checks, the sampler).

``--profile PATH`` writes a torch.profiler table (top ops by self CPU time) of the measured
iterations; ``--dump PATH`` writes each iteration's prompt token ids (unpadded, per row, as
passed to ``generate``) and completion lengths (up to and including the first EOS).
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

os.environ.update(common.THREAD_ENV)  # before torch loads

PHASES = ("generate", "reward", "ref_forward", "old_logp_forward", "experience_rest", "train_forward", "loss_rest",
          "backward", "clip", "optimizer")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", choices=["grpo", "rloo"], required=True)
    common.worker_args(ap)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--no-shuffle", action="store_true",
                    help="shuffle_dataset=False: the prompts in dataset order (as ours_critic_free.py feeds them)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the measured iterations here")
    ap.add_argument("--dump", default=None, help="write per-iteration prompt ids and completion lengths here")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback

    if args.algo == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    S = common.SETUP
    B, R = S["batch_size"], S["response_length"]
    torch.set_num_threads(S["threads"])
    art = Path(args.artifacts)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32)
    ds = Dataset.from_dict({"prompt": [p + "\n" for p in prompts]})  # format_prompt(p), as on our side
    n_iter = args.warmup + args.iters
    outdir = tempfile.mkdtemp(prefix=f"trl_{args.algo}_", dir=common.WORK)
    cfg = Config(
        output_dir=outdir,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.num_generations,
        max_completion_length=R,
        temperature=S["temperature"],
        top_k=0,
        top_p=1.0,
        beta=S["kl_coef"],
        learning_rate=S["lr"],
        max_steps=n_iter,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=S["seed"],
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
        disable_dropout=True,
        **({"shuffle_dataset": False} if args.no_shuffle else {}),
    )

    clock = time.perf_counter
    phase = {k: 0.0 for k in PHASES}
    calls = {k: 0 for k in PHASES}
    gen_times: list[float] = []
    gen_tokens: list[int] = []
    dump_iters: list[dict] = []
    eos, pad = tok.eos_token_id, tok.pad_token_id
    orig_generate = policy.generate

    def timed_generate(*a, **k):
        t = clock()
        out = orig_generate(*a, **k)
        dt = clock() - t
        gen_times.append(dt)
        phase["generate"] += dt
        calls["generate"] += 1
        seq = out.sequences if hasattr(out, "sequences") else out
        inp = k.get("input_ids", a[0] if a else None)
        P = inp.shape[1] if inp is not None else 0
        gen_tokens.append(int(seq.shape[0] * (seq.shape[1] - P)))
        if args.dump and inp is not None:
            mask = k.get("attention_mask")
            comp = seq[:, P:].tolist()
            lengths = [next((i + 1 for i, x in enumerate(row) if x == eos), len(row)) for row in comp]
            dump_iters.append({
                "prompt_ids": [row[m.bool()].tolist() for row, m in zip(inp, mask)] if mask is not None
                else [[x for x in row if x != pad] for row in inp.tolist()],
                "response_lengths": lengths, "terminated": [eos in row for row in comp],
                "sequences": int(seq.shape[0]), "prompt_columns": int(P), "response_columns": int(seq.shape[1] - P)})
        return out

    policy.generate = timed_generate

    stamps: list[float] = []
    cpu_stamps: list[float] = []
    phases: list[dict] = []
    per_iter_calls: list[dict] = []
    opt = {"t": 0.0}
    prof_box: dict = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            for k in phase:
                phase[k], calls[k] = 0.0, 0
            stamps.append(clock())
            cpu_stamps.append(time.process_time())

        def on_pre_optimizer_step(self, a, state, control, **kw):
            opt["t"] = clock()

        def on_optimizer_step(self, a, state, control, **kw):
            phase["optimizer"] += clock() - opt["t"]
            calls["optimizer"] += 1

        def on_step_end(self, a, state, control, **kw):
            stamps.append(clock())
            cpu_stamps.append(time.process_time())
            dt = stamps[-1] - stamps[-2]
            phases.append({**phase, "rest": dt - sum(phase.values())})
            per_iter_calls.append(dict(calls))
            for k in phase:
                phase[k], calls[k] = 0.0, 0
            if args.profile and len(phases) == args.warmup:
                from torch.profiler import ProfilerActivity, profile

                prof_box["p"] = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
                prof_box["p"].__enter__()

    trainer = Trainer(
        model=policy, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
        reward_processing_classes=tok, callbacks=[Timer()],
    )

    def timed(fn, name):
        """fn with its seconds added to phase[name]; the phases it calls inside are not counted twice."""
        inner = {"_generate_and_score_completions": ("generate", "reward", "ref_forward", "old_logp_forward"),
                 "compute_loss": ("train_forward",)}.get(fn.__name__, ())

        def wrapper(*a, **k):
            t, before = clock(), sum(phase[p] for p in inner)
            try:
                return fn(*a, **k)
            finally:
                phase[name] += clock() - t - (sum(phase[p] for p in inner) - before)
                calls[name] += 1
        return wrapper

    orig_logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(model, *a, **k):
        name = ("train_forward" if torch.is_grad_enabled()
                else "ref_forward" if model is trainer.ref_model else "old_logp_forward")
        t = clock()
        try:
            return orig_logps(model, *a, **k)
        finally:
            phase[name] += clock() - t
            calls[name] += 1

    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "experience_rest")
    trainer.compute_loss = timed(trainer.compute_loss, "loss_rest")
    trainer._clip_grad_norm = timed(trainer._clip_grad_norm, "clip")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    torch.set_num_threads(S["threads"])
    setup_s = time.perf_counter() - t_start
    trainer.train()
    if "p" in prof_box:
        prof_box["p"].__exit__(None, None, None)
        Path(args.profile).write_text(prof_box["p"].key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    times = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    if len(times) != n_iter:
        raise SystemExit(f"expected {n_iter} steps, timed {len(times)}")
    tokens = gen_tokens if len(gen_tokens) == len(times) else [B * R] * len(times)
    meas = phases[args.warmup:]
    phase_median = {k: round(common.median([p[k] for p in meas]), 4) for k in meas[0]}
    update_keys = ("train_forward", "loss_rest", "backward", "clip", "optimizer")
    a = trainer.args
    res = {
        "impl": f"trl_{args.algo}",
        "label": f"TRL {trl.__version__} {Trainer.__name__}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": __import__("accelerate").__version__, "datasets": __import__("datasets").__version__,
                     "tokenizers": __import__("tokenizers").__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "config": {"batch_size": B, "response_length": R, "num_generations": args.num_generations,
                   "prompts_per_iter": B // args.num_generations, "beta": S["kl_coef"], "critic": "none",
                   "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd, "gradient_checkpointing": False,
                   "token_count_source": "policy.generate" if tokens is gen_tokens else "assumed B*R",
                   "shuffle_dataset": getattr(a, "shuffle_dataset", None),
                   "trl_args": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                for k, v in ((k, getattr(a, k, None)) for k in (
                                    "loss_type", "scale_rewards", "normalize_advantages", "use_bias_correction_kl",
                                    "epsilon", "epsilon_high", "beta", "num_iterations", "steps_per_generation",
                                    "mask_truncated_completions", "top_entropy_quantile", "entropy_coef",
                                    "optim", "adam_epsilon", "weight_decay", "lr_scheduler_type", "max_grad_norm",
                                    "learning_rate", "temperature", "top_k", "top_p", "disable_dropout",
                                    "cast_lm_head_to_fp32", "pad_to_multiple_of"))}},
        **common.summarize(times, args.warmup, tokens, cpu),
        "generation_s_median": round(common.median(gen_times[args.warmup:]), 4) if len(gen_times) > args.warmup else None,
        "phase_s_median": phase_median,
        "update_s_median": round(common.median([sum(p[k] for k in update_keys) for p in meas]), 4),
        "per_iter_phases": [{k: round(v, 5) for k, v in p.items()} for p in phases],
        "calls_per_iter": per_iter_calls[-1] if per_iter_calls else None,
        **common.worker_footer(setup_s, load_start),
    }
    if args.profile:
        res["profile_path"] = args.profile
    common.write_json(Path(args.out), res)
    if args.dump:
        common.write_json(Path(args.dump), {"impl": res["impl"], "iterations": dump_iters,
                                            "pad_token_id": pad, "eos_token_id": eos})
    shutil.rmtree(outdir, ignore_errors=True)  # TRL's output_dir: nothing is saved in it
    print(f"trl_{args.algo}: {res['median_s_per_iter']} s/iter, {res.get('generated_tokens_per_s')} tok/s, "
          f"peak RSS {res['peak_rss_mib']} MiB, phases {phase_median}")


if __name__ == "__main__":
    main()
