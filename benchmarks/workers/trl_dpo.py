"""Worker: TRL 1.16 ``trl.DPOTrainer`` on the shared DPO setup; writes one JSON.

Runs in benchmarks/.venv-trl116 (see setup_venvs.sh). Same model directory (weights and
tokenizer), same pairs (``trl_records.json``: ours through ``to_trl_records``, i.e. the
prompt already formatted as ``prompt + "\\n"``; TRL appends the EOS to each reply, as ours
does), same batches: the train sampler is replaced by one that replays ``batch_order.json``
(the rows our ``DPOTrainer.batch_rows`` draws), so step k of both runs trains on the same
32 pairs. fp32, 2 threads, ``disable_dropout=True``, no gradient checkpointing (DPOConfig
defaults it on), no bf16 (DPOConfig defaults it on), constant lr, no eval, no saving,
logging only at step 1 (its grad norm is one of the orchestrator's identity checks) and
never during the measured steps. The policy and a separate reference copy are passed in;
``--precompute`` sets ``precompute_ref_log_probs=True`` (the reference pass runs once in
``__init__`` with ``precompute_ref_batch_size`` = ours' ``ref_batch_size``), without it the
reference forward runs inside every step.

Timing: a TrainerCallback stamps ``on_train_begin`` and every ``on_step_end``; a step is
the wall time between consecutive stamps (so the logging / saving checks after a step count
in the next one). Phase split from thin wrappers: ``data`` (``get_batch_samples``: the
dataloader fetch, i.e. Arrow rows to Python plus the collator), of which ``collate``
(``DataCollatorForPreference.torch_call``); ``forward`` (the policy's forward with TRL's
fused LM head, which returns the log-probs); ``ref_forward`` (without precompute);
``loss_metrics`` (the rest of ``compute_loss``: the loss and TRL's per-step metrics with
their ``.item()`` calls); ``backward`` (``accelerator.backward``); ``clip``
(``_clip_grad_norm``); ``optimizer`` (between ``on_pre_optimizer_step`` and
``on_optimizer_step``); ``rest`` (the Trainer loop's own bookkeeping: flops estimate, lr
scheduler, zero_grad, the log/save checks). ``--cprofile N`` and ``--dump PATH`` as in
ours_dpo.py.
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


def cprofile_top(prof, n: int) -> dict:
    import io
    import pstats

    out = {}
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(n)
        lines = buf.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        out[key] = [line.rstrip() for line in lines[start:] if line.strip()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    common.worker_args(ap)
    ap.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    ap.add_argument("--cprofile", type=int, default=0, help="cProfile the measured steps; report this many top rows")
    ap.add_argument("--dump", default=None, help="write token ids, reference log-probs and step stats here")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import json
    import shutil

    import torch
    import transformers
    import trl
    import trl.trainer.dpo_trainer as dpo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    D = common.DPO_SETUP
    torch.set_num_threads(D["threads"])
    art = Path(args.artifacts)
    records = json.loads((art / "trl_records.json").read_text())
    order = json.loads((art / "batch_order.json").read_text())
    n_steps = args.warmup + args.iters
    if n_steps > len(order):
        raise SystemExit(f"{n_steps} steps asked for, batch_order.json has {len(order)}")
    flat_order = [i for rows in order[:n_steps] for i in rows]
    tok = AutoTokenizer.from_pretrained(art / "model")
    tok.padding_side = "left"  # as rlhf_book.load_base_model; TRL asks for left padding (its collator pads right itself)
    torch.manual_seed(D["seed"])
    policy = AutoModelForCausalLM.from_pretrained(art / "model", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(art / "model", dtype=torch.float32)
    ds = Dataset.from_list(records)
    clock = time.perf_counter

    phase_keys = ("data", "collate", "forward", "ref_forward", "loss_metrics", "backward", "clip", "optimizer")
    phase = {k: 0.0 for k in phase_keys}
    tokens = {"real": 0, "padded": 0, "reply": 0}
    state = {"training": False}
    pre = {"prepare_dataset_s": 0.0, "precompute_ref_s": 0.0, "init_s": 0.0}

    orig_collate = dpo_mod.DataCollatorForPreference.torch_call

    def timed_collate(self, examples):
        t = clock()
        out = orig_collate(self, examples)
        if state["training"]:  # accelerate's dataloader fetches one batch ahead: this may be the next step's batch
            phase["collate"] += clock() - t
        return out

    dpo_mod.DataCollatorForPreference.torch_call = timed_collate

    class OrderSampler(torch.utils.data.Sampler):
        """Replays our trainer's batches: step k gets rows order[k] (batch size 32, no drop_last)."""

        def __iter__(self):
            return iter(flat_order)

        def __len__(self):
            return len(flat_order)

    class BenchDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return OrderSampler()

        def _prepare_dataset(self, *a, **k):
            t = clock()
            try:
                return super()._prepare_dataset(*a, **k)
            finally:
                pre["prepare_dataset_s"] += clock() - t

        def _precompute_ref_logps(self, *a, **k):
            t = clock()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                pre["precompute_ref_s"] += clock() - t

        def get_batch_samples(self, *a, **k):
            t = clock()
            try:
                return super().get_batch_samples(*a, **k)
            finally:
                phase["data"] += clock() - t

        def compute_loss(self, model, inputs, *a, **k):
            if state["training"]:  # the tokens of this step's batch (the collator may run a step ahead)
                tokens["real"] += int(inputs["attention_mask"].sum())
                tokens["reply"] += int(inputs["completion_mask"].sum())
                tokens["padded"] += inputs["input_ids"].numel()
            t = clock()
            f0, r0 = phase["forward"], phase["ref_forward"]
            try:
                return super().compute_loss(model, inputs, *a, **k)
            finally:
                phase["loss_metrics"] += (clock() - t) - (phase["forward"] - f0) - (phase["ref_forward"] - r0)

        def _clip_grad_norm(self, *a, **k):
            t = clock()
            try:
                return super()._clip_grad_norm(*a, **k)
            finally:
                phase["clip"] += clock() - t

    outdir = tempfile.mkdtemp(prefix="trl_dpo_", dir=common.WORK)
    cfg = DPOConfig(
        output_dir=outdir,
        per_device_train_batch_size=D["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=n_steps,
        learning_rate=D["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_epsilon=D["adam_eps"],
        max_grad_norm=D["max_grad_norm"],
        beta=D["beta"],
        loss_type=[D["loss_type"]],
        precompute_ref_log_probs=args.precompute,
        precompute_ref_batch_size=D["ref_batch_size"],
        disable_dropout=True,
        gradient_checkpointing=False,  # DPOConfig defaults to True; ours does not checkpoint
        bf16=False,  # DPOConfig defaults to bf16; the task is fp32
        fp16=False,
        use_cpu=True,
        seed=D["seed"],
        report_to=[],
        logging_steps=10_000,
        logging_first_step=True,  # step 1 (a warm-up step): its grad_norm is compared with ours
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    stamps: list[float] = []
    cpu_stamps: list[float] = []
    phases: list[dict] = []
    per_step_tokens: list[dict] = []
    opt = {"t": 0.0}
    prof_box: dict = {}
    margins: list[float] = []  # TRL's rewards/margins metric of every step (its lists are cleared at each log)
    box: dict = {}

    def reset():
        for k in phase:
            phase[k] = 0.0
        for k in tokens:
            tokens[k] = 0

    class Timer(TrainerCallback):
        def on_train_begin(self, a, st, control, **kw):
            state["training"] = True
            reset()
            stamps.append(clock())
            cpu_stamps.append(time.process_time())

        def on_pre_optimizer_step(self, a, st, control, **kw):
            opt["t"] = clock()

        def on_optimizer_step(self, a, st, control, **kw):
            phase["optimizer"] += clock() - opt["t"]

        def on_step_end(self, a, st, control, **kw):
            stamps.append(clock())
            cpu_stamps.append(time.process_time())
            dt = stamps[-1] - stamps[-2]
            rest = dt - sum(v for k, v in phase.items() if k != "collate")  # collate is part of data
            phases.append({**phase, "rest": rest})
            per_step_tokens.append(dict(tokens))
            m = box["trainer"]._metrics["train"].get("rewards/margins")
            margins.append(m[-1] if m else None)
            reset()
            if args.cprofile and len(phases) == args.warmup:
                import cProfile

                prof_box["p"] = cProfile.Profile()
                prof_box["p"].enable()

    t_init = clock()
    trainer = BenchDPOTrainer(
        model=policy, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()],
    )
    pre["init_s"] = clock() - t_init
    box["trainer"] = trainer

    # the policy's forward (TRL's fused LM head is installed as the instance's forward) and the reference's
    def timed_forward(fn, name):
        def wrapper(*a, **k):
            if not state["training"]:
                return fn(*a, **k)
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                phase[name] += clock() - t
        return wrapper

    trainer.model.forward = timed_forward(trainer.model.forward, "forward")
    if trainer.ref_model is not None:
        trainer.ref_model.forward = timed_forward(trainer.ref_model.forward, "ref_forward")
    orig_backward = trainer.accelerator.backward

    def timed_backward(*a, **k):
        t = clock()
        try:
            return orig_backward(*a, **k)
        finally:
            phase["backward"] += clock() - t

    trainer.accelerator.backward = timed_backward
    torch.set_num_threads(D["threads"])  # in case anything above changed it
    setup_s = time.perf_counter() - t_start

    t_train = clock()
    trainer.train()
    train_wall = clock() - t_train
    if "p" in prof_box:
        prof_box["p"].disable()

    times = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    if len(times) != n_steps:
        raise SystemExit(f"expected {n_steps} steps, timed {len(times)}")
    w = args.warmup
    real = [t["real"] for t in per_step_tokens]
    meas_phase = phases[w:]
    phase_median = {k: round(common.median([p[k] for p in meas_phase]), 5) for k in meas_phase[0]}
    first_log = next((h for h in trainer.state.log_history if "grad_norm" in h), {})
    res = {
        "impl": "trl_dpo_precompute" if args.precompute else "trl_dpo",
        "label": f"TRL {trl.__version__} DPOTrainer, precompute_ref_log_probs={args.precompute}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": __import__("accelerate").__version__, "datasets": __import__("datasets").__version__,
                     "tokenizers": __import__("tokenizers").__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "config": {"batch_size": cfg.per_device_train_batch_size, "beta": cfg.beta, "loss_type": cfg.loss_type,
                   "lr": cfg.learning_rate, "adam_eps": cfg.adam_epsilon, "max_grad_norm": cfg.max_grad_norm,
                   "optimizer": str(cfg.optim), "lr_schedule": str(cfg.lr_scheduler_type),
                   "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
                   "precompute_ref_batch_size": cfg.precompute_ref_batch_size, "disable_dropout": cfg.disable_dropout,
                   "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16, "max_length": cfg.max_length,
                   "n_pairs": len(records), "n_params": sum(p.numel() for p in policy.parameters()),
                   "reference": "separate frozen copy (ref_model)" + ("; log-probs precomputed in __init__"
                                                                      if args.precompute else "; forward every step")},
        **common.summarize(times, w, None, cpu),
        "tokens_per_step": real,
        "reply_tokens_per_step": [t["reply"] for t in per_step_tokens],
        "padded_tokens_per_step": [t["padded"] for t in per_step_tokens],
        "tokens_per_s": round(sum(real[w:]) / sum(times[w:]), 1),
        "precompute_ref_s": round(pre["precompute_ref_s"], 4) if args.precompute else None,
        "prepare_dataset_s": round(pre["prepare_dataset_s"], 4),  # EOS + tokenization (datasets.map), in __init__
        "trainer_init_s": round(pre["init_s"], 3),
        "train_call_wall_s": round(train_wall, 3),
        "phase_s_median": phase_median,
        "per_step_phases": [{k: round(v, 5) for k, v in p.items()} for p in phases],
        "first_logged_step": {k: v for k, v in first_log.items() if isinstance(v, (int, float))},
        "current_rss_mib": round(common.current_rss_mib(), 1),
        **common.worker_footer(setup_s, load_start),
    }
    if "p" in prof_box:
        res["cprofile"] = cprofile_top(prof_box["p"], args.cprofile)
    if args.dump:
        tds = trainer.train_dataset
        seqs = [{"prompt": r["prompt_ids"], "chosen": r["chosen_ids"], "rejected": r["rejected_ids"]} for r in tds]
        ref_logps = ([[a, b] for a, b in zip(tds["ref_chosen_logps"], tds["ref_rejected_logps"])]
                     if "ref_chosen_logps" in tds.column_names else None)
        common.write_json(Path(args.dump), {
            "sequences": seqs, "ref_logps": ref_logps, "grad_norm_step1": first_log.get("grad_norm"),
            "reward_margin": margins,  # TRL's rewards/margins metric, one per step
            "tokens_per_step": real,
        })
    shutil.rmtree(outdir, ignore_errors=True)
    common.write_json(Path(args.out), res)
    print(f"{res['impl']}: {res['median_s_per_iter']} s/step, {res['tokens_per_s']} tok/s, "
          f"precompute {res['precompute_ref_s']} s, peak RSS {res['peak_rss_mib']} MiB, phases {phase_median}")


if __name__ == "__main__":
    main()
