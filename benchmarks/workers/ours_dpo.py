"""Worker: ``rlhf_book.dpo.DPOTrainer`` on the shared DPO setup; writes one JSON.

Runs in the main Python (rlhf_book installed editable). The run is one ``DPOTrainer.train``
call over the benchmark's pairs (``common.DPO_SETUP``: 512 pairs, 32 pairs a step, sigmoid
loss, fp32, no evaluation, no checkpoints), for ``warmup + iters`` optimizer steps. Its
batches are drawn by the trainer itself (``batch_rows``); the worker checks them against
``batch_order.json``, which the TRL worker's sampler replays, so both see the same batches.

Timing: a thin wrapper around ``trainer.step`` stamps the end of every step (and the start of
the first), so a step's time is the wall time between consecutive step ends, the training
loop's own per-step work included, as TRL's ``on_step_end`` callback measures it. The
trainer's own ``step_seconds`` (inside ``step``) are reported too. The reference pass
(``DPOTrainer.prepare`` -> ``reference_logprobs``, once per data set) is timed separately.

Phase split (thin wrappers on the module functions ``step`` calls, only while grad is
enabled, so the reference pass is not counted): ``encode`` (``encode_pairs``: tokenizing
the prompts and replies of the batch and building the id / mask tensors), ``forward``
(``pair_logprobs``: the policy forward and the reply log-probs), ``loss`` (``dpo_loss``),
``backward`` (``Tensor.backward``), ``clip`` (``clip_grad_norm_``), ``optimizer``
(``optimizer.step``), ``rest`` (zero_grad, statistics, the loop). ``--cprofile N`` runs
cProfile over the measured steps and reports the top N functions (a diagnostic run: its
times are inflated by the profiler and are not used for the headline numbers).
``--dump PATH`` writes the token ids of every pair, the reference log-probs and the
per-step statistics, for the orchestrator's identical-setup checks.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.update(common.THREAD_ENV)
import rlhf_book  # noqa: E402  (before torch)


def cprofile_top(prof, n: int) -> dict:
    """Top ``n`` functions of a cProfile run by own time and by cumulative time, as short text rows."""
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
    ap.add_argument("--cprofile", type=int, default=0, help="cProfile the measured steps; report this many top rows")
    ap.add_argument("--dump", default=None, help="write token ids, reference log-probs and step stats here")
    args = ap.parse_args()
    load_start = common.loadavg()
    t_start = time.perf_counter()

    import json

    import torch
    import transformers

    import rlhf_book.dpo as dpo_mod
    from rlhf_book.dpo import DPOConfig, DPOTrainer

    D = common.DPO_SETUP
    rlhf_book.configure_threads(D["threads"])
    rlhf_book.set_seed(D["seed"])
    art = Path(args.artifacts)
    pairs = json.loads((art / "pairs.json").read_text())
    order = json.loads((art / "batch_order.json").read_text())
    n_steps = args.warmup + args.iters
    if n_steps > len(order):
        raise SystemExit(f"{n_steps} steps asked for, batch_order.json has {len(order)}")
    policy, tok = rlhf_book.load_base_model(str(art / "model"), device="cpu")
    ref, _ = rlhf_book.load_base_model(str(art / "model"), device="cpu")
    cfg = DPOConfig(
        beta=D["beta"], loss_type=D["loss_type"], lr=D["lr"], adam_eps=D["adam_eps"], max_grad_norm=D["max_grad_norm"],
        batch_size=D["batch_size"], minibatch_size=D["batch_size"], ref_batch_size=D["ref_batch_size"],
        precision="fp32", compile=False, disable_dropout=True, seed=D["seed"], progress=False,
        eval_every=0, checkpoint_every=0,
    )
    trainer = DPOTrainer(policy, ref, tok, cfg)
    spe = trainer.steps_per_epoch(len(pairs))
    clock = time.perf_counter

    # ---- phase wrappers (training steps only: grad enabled)
    phase = {k: 0.0 for k in ("encode", "forward", "loss", "backward", "clip", "optimizer")}
    tokens = {"real": 0, "padded": 0, "reply": 0}
    per_step_tokens: list[dict] = []

    def timed(name, fn, grad_only=True, after=None):
        def wrapper(*a, **k):
            if grad_only and not torch.is_grad_enabled():
                return fn(*a, **k)
            t = clock()
            try:
                out = fn(*a, **k)
            finally:
                phase[name] += clock() - t
            if after is not None:
                after(out)
            return out
        return wrapper

    def count(batch):
        tokens["real"] += int(batch.prompt_mask.sum()) + int(batch.response_mask.sum())
        tokens["reply"] += int(batch.response_mask.sum())
        tokens["padded"] += batch.prompt_ids.numel() + batch.response_ids.numel()

    orig_encode = dpo_mod.encode_pairs
    dpo_mod.encode_pairs = timed("encode", orig_encode, after=count)
    dpo_mod.pair_logprobs = timed("forward", dpo_mod.pair_logprobs)
    dpo_mod.dpo_loss = timed("loss", dpo_mod.dpo_loss)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward, grad_only=False)
    torch.nn.utils.clip_grad_norm_ = timed("clip", torch.nn.utils.clip_grad_norm_, grad_only=False)
    trainer.optimizer.step = timed("optimizer", trainer.optimizer.step, grad_only=False)

    # ---- the reference pass (once per data set, inside the first prepare())
    pre = {"reference_logprobs_s": 0.0, "prepare_s": 0.0, "prepare_calls": 0}
    orig_ref = dpo_mod.reference_logprobs

    def timed_ref(*a, **k):
        t = clock()
        try:
            return orig_ref(*a, **k)
        finally:
            pre["reference_logprobs_s"] += clock() - t

    dpo_mod.reference_logprobs = timed_ref
    orig_prepare = trainer.prepare

    def timed_prepare(*a, **k):
        t = clock()
        try:
            return orig_prepare(*a, **k)
        finally:
            pre["prepare_s"] += clock() - t
            pre["prepare_calls"] += 1

    trainer.prepare = timed_prepare

    # ---- step timing
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    phases: list[dict] = []
    rows_seen: list[list[int]] = []
    prof = None
    orig_step = trainer.step

    def timed_step(rows):
        nonlocal prof
        if not stamps:
            stamps.append(clock())
            cpu_stamps.append(time.process_time())
        if args.cprofile and len(phases) == args.warmup:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        rows_seen.append(list(rows))
        for k in phase:
            phase[k] = 0.0
        for k in tokens:
            tokens[k] = 0
        t = clock()
        stats = orig_step(rows)
        total = clock() - t
        phases.append({**phase, "rest": total - sum(phase.values())})
        per_step_tokens.append(dict(tokens))
        stamps.append(clock())
        cpu_stamps.append(time.process_time())
        return stats

    trainer.step = timed_step
    setup_s = time.perf_counter() - t_start

    t_train = clock()
    history = trainer.train(pairs, epochs=n_steps / spe)
    train_wall = clock() - t_train
    if prof is not None:
        prof.disable()

    times = [b - a for a, b in itertools.pairwise(stamps)]
    cpu = [b - a for a, b in itertools.pairwise(cpu_stamps)]
    if len(times) != n_steps:
        raise SystemExit(f"expected {n_steps} steps, timed {len(times)}")
    if rows_seen != order[:n_steps]:
        raise SystemExit("the trainer's batches differ from batch_order.json")
    w = args.warmup
    real = [t["real"] for t in per_step_tokens]
    meas_phase = phases[w:]
    phase_median = {k: round(common.median([p[k] for p in meas_phase]), 5) for k in meas_phase[0]}
    step_seconds = [h["step_seconds"] for h in history]
    res = {
        "impl": "ours_dpo",
        "label": "rlhf_book DPOTrainer (reference log-probs precomputed in prepare())",
        "versions": {"rlhf_book": rlhf_book.__version__,
                     "rlhf_book_dpo_sha1": __import__("hashlib").sha1(Path(dpo_mod.__file__).read_bytes()).hexdigest()[:12],
                     "transformers": transformers.__version__, "torch": torch.__version__,
                     "tokenizers": __import__("tokenizers").__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "config": {"batch_size": cfg.batch_size, "minibatch_size": cfg.minibatch_size, "beta": cfg.beta,
                   "loss_type": cfg.loss_type, "lr": cfg.lr, "adam_eps": cfg.adam_eps, "max_grad_norm": cfg.max_grad_norm,
                   "optimizer": type(trainer.optimizer).__name__ + (" (fused)" if trainer.optimizer.defaults.get("fused") else ""),
                   "lr_schedule": "constant", "precision": trainer.precision, "compile": cfg.compile,
                   "disable_dropout": cfg.disable_dropout, "ref_batch_size": cfg.ref_batch_size,
                   "n_pairs": len(pairs), "n_params": sum(p.numel() for p in policy.parameters()),
                   "reference": "separate frozen copy; log-probs precomputed once (prepare)"},
        **common.summarize(times, w, None, cpu),
        "trainer_step_seconds": [round(s, 4) for s in step_seconds],
        "median_trainer_step_seconds": round(common.median(step_seconds[w:]), 4),
        "tokens_per_step": real,  # non-pad tokens (prompt + reply) of the chosen and the rejected rows
        "reply_tokens_per_step": [t["reply"] for t in per_step_tokens],
        "padded_tokens_per_step": [t["padded"] for t in per_step_tokens],
        "tokens_per_s": round(sum(real[w:]) / sum(times[w:]), 1),
        "precompute_ref_s": round(pre["reference_logprobs_s"], 4),
        "prepare_s": round(pre["prepare_s"], 4),  # validation + reference pass (+ the digest lookups of later calls)
        "prepare_calls": pre["prepare_calls"],
        "train_call_wall_s": round(train_wall, 3),
        "phase_s_median": phase_median,
        "per_step_phases": [{k: round(v, 5) for k, v in p.items()} for p in phases],
        "current_rss_mib": round(common.current_rss_mib(), 1),
        "last_stats": {k: (round(v, 5) if isinstance(v, float) else v) for k, v in history[-1].items()},
        **common.worker_footer(setup_s, load_start),
    }
    if prof is not None:
        res["cprofile"] = cprofile_top(prof, args.cprofile)
    if args.dump:
        seqs = []
        with torch.no_grad():
            for i in range(0, len(pairs), 128):
                b = orig_encode(tok, pairs[i: i + 128])
                n = b.prompt_ids.size(0) // 2
                for r in range(n):
                    pc, rc = r, r + n
                    seqs.append({
                        "prompt": b.prompt_ids[pc][b.prompt_mask[pc].bool()].tolist(),
                        "chosen": b.response_ids[pc][b.response_mask[pc].bool()].tolist(),
                        "rejected": b.response_ids[rc][b.response_mask[rc].bool()].tolist(),
                    })
        common.write_json(Path(args.dump), {
            "sequences": seqs, "ref_logps": trainer.ref_logps.tolist(),
            "grad_norm": [h["grad_norm"] for h in history], "reward_margin": [h["reward_margin"] for h in history],
            "loss": [h["loss"] for h in history], "tokens_per_step": real,
        })
    common.write_json(Path(args.out), res)
    print(f"ours_dpo: {res['median_s_per_iter']} s/step, {res['tokens_per_s']} tok/s, precompute {res['precompute_ref_s']} s, "
          f"peak RSS {res['peak_rss_mib']} MiB, phases {phase_median}")


if __name__ == "__main__":
    main()
