"""Worker: TRL 1.16 ``GRPOTrainer`` or ``RLOOTrainer`` on the shared setup (for context); writes one JSON.

Runs in benchmarks/.venv-trl116. Same weights, tokenizer, prompts, reward model, 16 sequences
and 24 new tokens per iteration as the PPO comparison; 16 sequences = 4 prompts x 4 samples
(both algorithms need a group per prompt). One iteration = one optimizer step with
``steps_per_generation=1`` and ``num_iterations=1`` (generate 16, ref + reward forwards, one
policy update). ``beta`` = the PPO KL coefficient, so the reference forward is included. No
critic: these algorithms have none, so they are cheaper per iteration than PPO by design.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--algo", choices=["grpo", "rloo"], required=True)
    common.worker_args(ap)
    ap.add_argument("--num-generations", type=int, default=4)
    common.variant_args(ap)
    args = ap.parse_args()
    mallopt_ok = common.apply_mallopt() if args.mallopt else None
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
    mk = common.model_kwargs(args)
    tok, prompts = common.load_tokenizer_and_prompts(art)
    policy = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32, **mk)
    reward = GPT2ForSequenceClassification.from_pretrained(art / "reward", dtype=torch.float32, **mk)
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
        model_init_kwargs=mk or None,  # the reference model is built from the path by TRL
    )

    gen_times: list[float] = []
    gen_tokens: list[int] = []
    orig_generate = policy.generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        out = orig_generate(*a, **k)
        gen_times.append(time.perf_counter() - t)
        seq = out.sequences if hasattr(out, "sequences") else out
        inp = k.get("input_ids", a[0] if a else None)
        gen_tokens.append(int(seq.shape[0] * (seq.shape[1] - (inp.shape[1] if inp is not None else 0))))
        return out

    policy.generate = timed_generate

    stamps: list[float] = []
    cpu_stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(time.perf_counter())
            cpu_stamps.append(time.process_time())

    trainer = Trainer(
        model=policy, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
        reward_processing_classes=tok, callbacks=[Timer()],
    )
    torch.set_num_threads(S["threads"])
    setup_s = time.perf_counter() - t_start
    trainer.train()
    times = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    tokens = gen_tokens if len(gen_tokens) == len(times) else [B * R] * len(times)
    res = {
        "impl": f"trl_{args.algo}",
        "label": f"TRL {trl.__version__} {Trainer.__name__}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": __import__("accelerate").__version__, "datasets": __import__("datasets").__version__,
                     "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "variant": {"mallopt": mallopt_ok, "activation": args.activation or policy.config.activation_function},
        "config": {"batch_size": B, "response_length": R, "num_generations": args.num_generations,
                   "prompts_per_iter": B // args.num_generations, "beta": S["kl_coef"], "critic": "none",
                   "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd, "gradient_checkpointing": False,
                   "token_count_source": "policy.generate" if tokens is gen_tokens else "assumed B*R"},
        **common.summarize(times, args.warmup, tokens, cpu),
        "generation_s_median": round(common.median(gen_times[args.warmup:]), 4) if len(gen_times) > args.warmup else None,
        **common.worker_footer(setup_s, load_start),
    }
    common.write_json(Path(args.out), res)
    print(f"trl_{args.algo}: {res['median_s_per_iter']} s/iter, {res.get('generated_tokens_per_s')} tok/s, "
          f"peak RSS {res['peak_rss_mib']} MiB")


if __name__ == "__main__":
    main()
