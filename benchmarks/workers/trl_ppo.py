"""Worker: TRL 1.12 ``trl.experimental.ppo.PPOTrainer`` on the shared setup; writes one JSON.

Runs in benchmarks/.venv-trl112 (see setup_venvs.sh). One "iteration" is one PPO update of
TRL's train loop: generate ``batch_size`` responses, ref/value/reward forwards, GAE,
1 epoch x 1 minibatch of policy+value update. Times come from a TrainerCallback
(``on_step_end``); generation time from a wrapper around TRL's ``batch_generation``.

``--device cuda --precision bf16`` (benchmarks/run_gpu.py): ``use_cpu=False``, ``bf16=True``,
``tf32=True`` (ours switches TF32 on by default). TRL's ``bf16=True`` is accelerate's autocast
around the forward of the prepared policy+value wrapper, i.e. the training forward only:
generation (on the unwrapped policy), the reference forward and the value/reward scoring
run in fp32. ``--bf16-scope all`` (the default, like-for-like with ours, which autocasts
every forward) runs those three under ``torch.autocast(bf16)`` too, from the same wrappers
that time them; ``--bf16-scope train`` is TRL as shipped. On CUDA each clock read is preceded
by ``torch.cuda.synchronize()`` and the result adds the peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.update(common.THREAD_ENV)  # before torch loads


def main() -> None:
    ap = argparse.ArgumentParser()
    common.worker_args(ap)
    ap.add_argument("--response-length", type=int, default=common.SETUP["response_length"])
    ap.add_argument("--batch-size", type=int, default=common.SETUP["batch_size"])
    ap.add_argument("--no-gc", action="store_true",
                    help="make TRL's two per-iteration gc.collect() calls no-ops (to isolate their cost)")
    ap.add_argument("--device", default="cpu", help="cpu (the CPU benchmark) or cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="PPOConfig.bf16 (mixed precision)")
    ap.add_argument("--bf16-scope", choices=["all", "train"], default="all",
                    help="with bf16: autocast generation and the scoring forwards too (all), or only TRL's own (train)")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    S = common.SETUP
    torch.set_num_threads(S["threads"])
    art = Path(args.artifacts)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    torch.manual_seed(S["seed"])
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    ref = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32)
    value = GPT2ForSequenceClassification.from_pretrained(art / "value", dtype=torch.float32)
    for m in (policy, ref, reward, value):  # TRL would move them itself (accelerator.device); explicit is clearer
        m.to(args.device)
    cuda = args.device.startswith("cuda")

    clock = common.make_clock(args.device)

    def rollout_autocast():
        """bf16 autocast for generation and the scoring forwards (``--bf16-scope all``), else nothing."""
        if args.precision == "bf16" and args.bf16_scope == "all":
            return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # the policy's text is format_prompt(p) = p + "\n" (rlhf_book.tokenizer.SEP), as on our side
    ds = Dataset.from_dict({"input_ids": [tok(p + "\n")["input_ids"] for p in prompts]})
    n_iter = args.warmup + args.iters
    outdir = tempfile.mkdtemp(prefix="trl_ppo_", dir=common.WORK)
    cfg = PPOConfig(
        output_dir=outdir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_mini_batches=S["minibatches"],
        num_ppo_epochs=S["ppo_epochs"],
        local_rollout_forward_batch_size=args.batch_size,
        total_episodes=args.batch_size * n_iter,
        response_length=args.response_length,
        stop_token="eos",
        temperature=S["temperature"],
        kl_coef=S["kl_coef"],
        learning_rate=S["lr"],
        missing_eos_penalty=None,
        num_sample_generations=0,
        gradient_checkpointing=False,  # PPOConfig defaults to True; ours does not checkpoint
        bf16=args.precision == "bf16",  # PPOConfig defaults to bf16; the CPU task is fp32
        fp16=False,
        use_cpu=not cuda,
        **({"tf32": True} if cuda else {}),  # like ours (PPOConfig.tf32); TrainingArguments rejects tf32 on a CPU
        seed=S["seed"],
        report_to=[],
        logging_steps=10_000,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    gen_times: list[float] = []
    gen_tokens: list[int] = []
    real_tokens: list[int] = []
    train_tokens: list[int] = []
    max_id: list[int] = []
    orig_bg = ppo_mod.batch_generation

    def timed_batch_generation(model, queries, *a, **k):
        t = clock()
        with rollout_autocast():
            qr, logits = orig_bg(model, queries, *a, **k)
        gen_times.append(clock() - t)
        resp = qr[:, queries.shape[1]:]
        gen_tokens.append(int(resp.numel()))
        # tokens trained: every (query + response) column of every sequence, once per PPO epoch
        train_tokens.append(int(qr.numel()) * S["ppo_epochs"])
        max_id.append(int(resp.max()))
        # tokens up to and including the first EOS (what a stop-at-EOS sampler must produce)
        is_eos = (resp == tok.eos_token_id).int()
        real_tokens.append(int(((is_eos.cumsum(1) - is_eos) == 0).sum()))
        return qr, logits

    ppo_mod.batch_generation = timed_batch_generation

    # phase split like ours: reference forward (no grad) and value + reward forwards (get_reward)
    phase = {"ref_forward": 0.0, "value_reward_forwards": 0.0, "gc_collect": 0.0}
    per_iter_phase: list[dict] = []
    orig_forward, orig_get_reward = ppo_mod.forward, ppo_mod.get_reward

    def timed_forward(*a, **k):
        if torch.is_grad_enabled():  # the training forward (accelerate's own autocast when bf16)
            return orig_forward(*a, **k)
        t = clock()
        try:
            with rollout_autocast():
                return orig_forward(*a, **k)
        finally:
            phase["ref_forward"] += clock() - t

    def timed_get_reward(*a, **k):
        t = clock()
        try:
            with rollout_autocast():
                return orig_get_reward(*a, **k)
        finally:
            phase["value_reward_forwards"] += clock() - t

    ppo_mod.forward, ppo_mod.get_reward = timed_forward, timed_get_reward

    import gc as _gc
    import types

    def timed_collect(*a, **k):  # PPOTrainer.train calls gc.collect() twice per iteration
        t = time.perf_counter()
        try:
            return 0 if args.no_gc else _gc.collect(*a, **k)
        finally:
            phase["gc_collect"] += time.perf_counter() - t

    ppo_mod.gc = types.SimpleNamespace(collect=timed_collect)

    stamps: list[float] = []
    cpu_stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(clock())
            cpu_stamps.append(time.process_time())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(clock())
            cpu_stamps.append(time.process_time())
            per_iter_phase.append(dict(phase))
            for k in phase:
                phase[k] = 0.0

    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
        train_dataset=ds, value_model=value, eval_dataset=ds, callbacks=[Timer()],
    )
    torch.set_num_threads(S["threads"])  # in case anything above changed it
    setup_s = time.perf_counter() - t_start
    trainer.train()
    times = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    res = {
        "impl": "trl_ppo_no_gc" if args.no_gc else "trl_ppo",
        "label": f"TRL {trl.__version__} experimental.ppo.PPOTrainer" + (" with gc.collect() patched out" if args.no_gc else ""),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": __import__("accelerate").__version__, "datasets": __import__("datasets").__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "device": args.device,
        "precision": args.precision,
        "bf16_scope": args.bf16_scope if args.precision == "bf16" else None,
        "config": {"batch_size": args.batch_size, "response_length": args.response_length,
                   "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd, "n_head": policy.config.n_head,
                   "vocab_size": policy.config.vocab_size, "ppo_epochs": S["ppo_epochs"],
                   "critic": "separate GPT2ForSequenceClassification (value_model)", "gradient_checkpointing": False},
        **common.summarize(times, args.warmup, gen_tokens, cpu),
        "generation_s_median": round(common.median(gen_times[args.warmup:]), 4),
        "phase_s_median": {
            "generate": round(common.median(gen_times[args.warmup:]), 4),
            "ref_forward": round(common.median([p["ref_forward"] for p in per_iter_phase[args.warmup:]]), 4),
            "value_reward_forwards": round(common.median([p["value_reward_forwards"] for p in per_iter_phase[args.warmup:]]), 4),
            "gc_collect": round(common.median([p["gc_collect"] for p in per_iter_phase[args.warmup:]]), 4),
            "update_and_rest": round(common.median([t - g - p["ref_forward"] - p["value_reward_forwards"] - p["gc_collect"] for t, g, p in
                                                    zip(times[args.warmup:], gen_times[args.warmup:], per_iter_phase[args.warmup:])]), 4),
        },
        "real_tokens_per_iter": round(sum(real_tokens[args.warmup:]) / max(1, len(real_tokens[args.warmup:])), 1),
        # per iteration, warm-up included (run_gpu.py computes tokens/s and MFU from these). TRL's loop is
        # not split into functions after scoring, so "update" = iteration - generation - scoring forwards -
        # gc.collect(): the PPO update plus log-probs from the stored generation logits, GAE and statistics.
        "per_iter": {"generation_s": [round(g, 4) for g in gen_times],
                     "update_s": [round(t - g - p["ref_forward"] - p["value_reward_forwards"] - p["gc_collect"], 4)
                                  for t, g, p in zip(times, gen_times, per_iter_phase)],
                     "generated_tokens": gen_tokens, "train_tokens": train_tokens},
        "max_sampled_id": max(max_id),
        **common.gpu_memory(args.device),
        **common.worker_footer(setup_s, load_start),
    }
    common.write_json(Path(args.out), res)
    print(f"trl_ppo: {res['median_s_per_iter']} s/iter, {res.get('generated_tokens_per_s')} tok/s, "
          f"peak RSS {res['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
