"""CPU benchmark: rlhf_book GRPO and RLOO (``CriticFreeTrainer``) vs TRL 1.16 GRPOTrainer / RLOOTrainer.

    python benchmarks/run_cpu_grpo_rloo_vs_trl.py --rounds 3   # ~6 min on 2 cores; creates the TRL venvs on first use

One process tree, one session: this orchestrator (the book's Python) builds the shared
artefacts once in benchmarks/.work (``common.build_artifacts``: the PPO benchmark's tokenizer,
64 prompts, random-init policy and reward model), then launches every implementation in its
own subprocess with the identical environment (OMP_WAIT_POLICY=PASSIVE, 2 threads, offline).
Each worker writes a JSON; this script merges them into
benchmarks/results/cpu_grpo_rloo_vs_trl.json and .md.

Implementations (rows): ours GRPO, TRL GRPO, ours RLOO, TRL RLOO, on the identical setup:
4 prompts x K = 4 samples = 16 sequences, 24 new tokens, temperature 1, beta = 0.05 (so the
reference forward runs), one optimizer step per iteration, fp32, dropout off; each side with
TRL's defaults for its algorithm (``workers/ours_critic_free.py`` says how ours is configured
to match, ``workers/trl_grpo_rloo.py`` what TRL runs). TRL's sampler keeps the dataset order
(``--no-shuffle``), so both sides see the same 4 prompts in every iteration.

``--rounds N`` repeats the sequence N times so slow drifts in the load hit every implementation
alike; rounds 1, 3, ... run each pair ours first, rounds 2, 4, ... TRL first, so neither side
always runs right after the other. The medians pool the measured iterations of all rounds; the ratio
ours / TRL is also given per round. Round 1 also dumps each side's prompt token ids and
response shapes per iteration, and the orchestrator checks that both saw the same prompts (the
same ids in the same rows), the same number of sequences and the same prompt and response
columns. After the rounds, one extra torch.profiler run per implementation (``--no-profile``
skips it) lists the top ops of the measured iterations; those runs are diagnostics, never timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

WORKERS = common.HERE / "workers"

IMPLS = {
    # name: (python, script, extra args)
    "ours_grpo": ("main", "ours_critic_free.py", ["--algo", "grpo"]),
    "trl_grpo": ("trl116", "trl_grpo_rloo.py", ["--algo", "grpo", "--no-shuffle"]),
    "ours_rloo": ("main", "ours_critic_free.py", ["--algo", "rloo"]),
    "trl_rloo": ("trl116", "trl_grpo_rloo.py", ["--algo", "rloo", "--no-shuffle"]),
}
PAIRS = {"grpo": ("ours_grpo", "trl_grpo"), "rloo": ("ours_rloo", "trl_rloo")}
GOAL = 0.5  # the target for ours / TRL (s/iter)
# the phases shown side by side: ours from the trainer's timings, TRL's from its worker's wrappers
PHASE_GROUPS = ("generate", "reward", "ref_forward", "old_logp_forward", "experience_rest", "update", "rest")
TRL_UPDATE = ("train_forward", "loss_rest", "backward", "clip", "optimizer")
PROFILE_ROWS = 18  # op rows of each torch.profiler table in the Markdown






def run_worker(name: str, art: Path, out: Path, warmup: int, iters: int, extra: list[str],
               tree: Path | None = None) -> dict:
    """One worker run; ``tree``: an earlier commit's unpacked tree (``--before``) whose rlhf_book and worker run instead."""
    kind, script, args = IMPLS[name.removesuffix("_before")]
    workers = WORKERS if tree is None else tree / "benchmarks" / "workers"
    cmd = [common.python_for(kind), str(workers / script), "--artifacts", str(art), "--out", str(out),
           "--warmup", str(warmup), "--iters", str(iters), *args, *extra]
    env = common.worker_env() if tree is None else common.worker_env({"PYTHONPATH": str(tree)})
    res = common.launch(name, cmd, out, env, common.REPO if tree is None else tree)
    if tree is not None:
        res["label"] += f" at {tree.name.removeprefix('rev-')} (before)"
    print(f"  {name:10s} {res['median_s_per_iter']:.4f} s/iter  cpu {res.get('median_cpu_s_per_iter')} s/iter  "
          f"{res.get('generated_tokens_per_s')} tok/s  RSS {res['peak_rss_mib']:.0f} MiB  "
          f"load {res['loadavg_start'][0]}->{res['loadavg_end'][0]}  ({res['wall_s']:.0f} s)"
          + (f"  busy: {res['other_busy_processes_after']}" if res["other_busy_processes_after"] else ""), flush=True)
    return res


def grouped_phases(name: str, p: dict) -> dict:
    """One iteration's phases in the common groups (``PHASE_GROUPS``); TRL's update = its forward ... optimizer."""
    if name.startswith("trl_"):
        g = {k: p[k] for k in ("generate", "reward", "ref_forward", "old_logp_forward", "experience_rest", "rest")}
        g["update"] = sum(p[k] for k in TRL_UPDATE)
    else:
        g = {k: p[k] for k in ("generate", "reward", "ref_forward", "experience_rest", "update", "rest")}
        g["old_logp_forward"] = 0.0  # ours takes log pi_old from the sampler
    return {k: g[k] for k in PHASE_GROUPS}


def merge(name: str, runs: list[dict]) -> dict:
    """Pool the measured iterations of every round of one implementation."""
    tok = sum(r["generated_tokens_per_iter"] for r in runs) / len(runs)
    per_iter = [p for r in runs for p in r["per_iter_phases"][r["warmup"]:]]
    out = common.pooled(runs)
    grouped = [grouped_phases(name, p) for p in per_iter]
    return {
        **out, "generated_tokens_per_iter": round(tok, 1),
        "generated_tokens_per_s": round(tok / out["median_s_per_iter"], 1),
        "phase_s_median": {k: round(common.median([p[k] for p in per_iter]), 4) for k in per_iter[0]},
        "phase_groups_s_median": {k: round(common.median([g[k] for g in grouped]), 4) for k in PHASE_GROUPS},
        "calls_per_iter": runs[0].get("calls_per_iter"),
    }


def check_identity(a: dict, b: dict) -> dict:
    """Compare the round-1 dumps of ours and TRL: prompt ids per row, sequences, columns, response lengths."""
    ia, ib = a["iterations"], b["iterations"]
    n = min(len(ia), len(ib))
    diff_prompts = [i for i in range(n) if ia[i]["prompt_ids"] != ib[i]["prompt_ids"]]
    out = {
        "iterations_compared": n, "iterations_in_each": [len(ia), len(ib)],
        "iterations_with_different_prompt_ids": len(diff_prompts), "first_differences": diff_prompts[:5],
        "prompt_tokens_per_iter": [sum(len(p) for p in it["prompt_ids"]) for it in ia[:n]],
        "sequences_equal": all(ia[i]["sequences"] == ib[i]["sequences"] for i in range(n)),
        "sequences": sorted({it["sequences"] for it in ia[:n]} | {it["sequences"] for it in ib[:n]}),
        "prompt_columns_equal": all(ia[i]["prompt_columns"] == ib[i]["prompt_columns"] for i in range(n)),
        "response_columns": [sorted({it["response_columns"] for it in ia[:n]}),
                             sorted({it["response_columns"] for it in ib[:n]})],
        "response_columns_equal": all(ia[i]["response_columns"] == ib[i]["response_columns"] for i in range(n)),
        "response_tokens_mean": [round(sum(sum(it["response_lengths"]) for it in x[:n]) / n, 1) for x in (ia, ib)],
        "terminated_share": [round(sum(sum(it["terminated"]) for it in x[:n]) / sum(it["sequences"] for it in x[:n]), 4)
                             for x in (ia, ib)],
    }
    out["same_setup"] = (out["iterations_with_different_prompt_ids"] == 0 and out["sequences_equal"]
                         and out["prompt_columns_equal"] and out["response_columns_equal"])
    return out


def profile_rows(text: str, n: int) -> list[str]:
    """The header and first ``n`` op rows of a torch.profiler ``key_averages().table()``."""
    lines = [line.rstrip() for line in text.splitlines()]
    seps = [i for i, line in enumerate(lines) if line.startswith("---")]
    if len(seps) < 2:
        return lines[: n + 3]
    body = lines[seps[1] + 1:]
    rows = [line for line in body if line and not line.startswith("---")][:n]
    tail = [line for line in lines if line.startswith("Self CPU time total")]
    return lines[seps[0] : seps[1] + 1] + rows + tail


def fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


UNAVOIDABLE = [
    ("Sampling", ("different random streams (ours: `torch.multinomial` with the trainer's generator in our KV-cache "
     "loop; TRL: transformers `generate`), so the replies differ and so do their EOS positions; the random policy "
     "almost never emits EOS, so both sample all 24 positions of nearly every row (the check above).")),
    ("Sampling threads", ("ours samples on 1 intra-op thread (`generation_threads=1`, the library's default), "
     "TRL's `generate` on the process's 2.")),
    ("log pi_old", ("ours keeps the sampler's log-probs (exact in fp32). TRL GRPO with one step per generation uses "
     "the training forward's detached log-probs (no extra forward); TRL RLOO always recomputes them with a no-grad "
     "policy forward (`old_logp_forward`): one forward more per iteration, TRL's design, counted as its cost.")),
    ("LM head", ("TRL runs its fused, chunked log-prob head (`fused_lm_head=True`, which also computes the entropy "
     "inside the training forward); ours `logits_to_keep` + `log_softmax`, entropy outside the graph "
     "(`entropy_coef=0`).")),
    ("Reward input", ("both decode the replies and re-tokenize the text for the reward model (one forward of 16 "
     "rows). Ours: `format_prompt(p)` + stripped reply + EOS when terminated, left-padded, positions from the mask; "
     "TRL: `p + \"\\n\"` + the decoded completion (special tokens skipped, not stripped), right-padded, no EOS.")),
    ("RLOO loss", ("TRL: the ratio of summed log-probs per reply, mean over replies; ours: token ratios with "
     "`loss_type=\"dr_grpo\"`, whose on-policy gradient is TRL's divided by 24. Same forward and backward.")),
    ("Optimizer", ("TRL: `adamw_torch_fused` (weight decay 0, eps 1e-8), linear lr decay; ours: fused Adam, eps "
     "1e-5, constant lr. The same kernel count.")),
    ("Bookkeeping", ("TRL's Trainer loop (flops estimate, scheduler, log checks) and its per-step metrics with "
     "`.item()` calls; ours reads its statistics once after the update.")),
]


def write_markdown(res: dict, path: Path) -> None:
    S, imp = res["setup"], res["implementations"]
    ls, le = res["load_start"], res["load_end"]
    busy = ls.get("busy_processes") or le.get("busy_processes")
    lines = [
        "# CPU benchmark: rlhf_book GRPO / RLOO vs TRL 1.16 GRPOTrainer / RLOOTrainer",
        "",
        (f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}), "
         f"{res['machine']['mem_gib']} GiB. Threads: {S['threads']}, OMP_WAIT_POLICY=PASSIVE, fp32, offline."),
        "",
        (f"**Load.** Start: load average {ls['loadavg']} (`{ls['uptime']}`); end: {le['loadavg']} (`{le['uptime']}`). "
         f"Other processes using >= 20% of a CPU at start: {ls.get('busy_processes') or 'none'}; at end: "
         f"{le.get('busy_processes') or 'none'}. "
         + ("**Another job was using the CPUs during this run: absolute seconds are inflated; compare the ratios "
            "(each round runs both sides of a pair back to back).**" if busy else "No other job was seen at start or end.")
         + " Per-worker load averages (1 min, start -> end) and busy processes after each worker are in the JSON."),
        "",
        (f"Setup (`common.SETUP`, shared with the PPO benchmark): random-init GPT-2 ({S['n_layer']} layers, width "
         f"{S['n_embd']}, {S['n_head']} heads, vocab {res['vocab_size']}), the same weights for policy and reference "
         f"(one directory), tokenizer `rlhf_book.train_tokenizer` (PAD != EOS), the 64 corpus prompts as `prompt + "
         f"\"\\n\"`, 4 prompts x K = 4 samples = {S['batch_size']} sequences per iteration (the prompts in order, 4 "
         f"an iteration, on both sides), {S['response_length']} new tokens, temperature {S['temperature']}, top-k / "
         f"top-p off, beta = {S['kl_coef']} (the reference forward runs), one optimizer step per iteration "
         f"(`num_iterations=1`, one minibatch of 16), lr {S['lr']}, clip 1.0, dropout off, fp32; reward = one "
         f"random-init GPT2ForSequenceClassification on the re-tokenized text. GRPO: group-std advantages, "
         f"`loss_type=\"dapo\"`, beta * k3 in the loss; RLOO: leave-one-out advantages, beta * sum k1 in the reward, "
         f"no advantage normalisation. {res['warmup']} warm-up + {res['iters']} measured iterations per run, "
         f"{res['rounds']} round(s), measured iterations pooled."),
        "",
        f"Command: `{res['command']}`",
        "",
        ("| implementation | median s/iter (wall) | per round | median CPU s/iter | generated tokens/s | "
         "peak RSS (MiB) | ours / TRL (wall) | ours / TRL (CPU) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for algo, (o, t) in PAIRS.items():
        for name in (o, f"{o}_before", t):
            if name not in imp:
                continue
            r = imp[name]
            rr = res.get("ratios", {}).get(algo, {})
            mine = name == o and rr
            lines.append(f"| {r['label']} | {r['median_s_per_iter']:.4f} | {', '.join(fmt(x) for x in r['round_medians_s'])} | "
                         f"{fmt(r['median_cpu_s_per_iter'], 4)} | {r['generated_tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                         f"{fmt(rr.get('wall')) if mine else ''} | {fmt(rr.get('cpu')) if mine else ''} |")
    for algo, rr in res.get("ratios", {}).items():
        verdict = "meets" if rr["meets_goal"] else "does **not** meet"
        if "before_wall" in rr:
            lines += ["", (f"**Before / after** (our library at `{res['before_rev']}` vs this tree, same rounds): "
                           f"{algo.upper()} ours / TRL wall {rr['before_wall']:.2f} before (per round "
                           f"{rr['before_wall_per_round']}), {rr['wall']:.2f} after.")]
        lines += ["", (f"**{algo.upper()}: ours / TRL = {rr['wall']:.2f} wall s/iter** (per round: {rr['wall_per_round']}); "
                       f"CPU s/iter {fmt(rr.get('cpu'))} (per round: {rr.get('cpu_per_round')}); generated tokens/s "
                       f"{rr['tokens_per_s']:.2f}x TRL's; peak RSS {rr['rss']:.2f}x. The issue's goal is <= {GOAL}: this "
                       f"{verdict} it.")]
    lines += ["", ("Generated tokens/s = sampled positions per iteration (16 x 24, PAD after an EOS included, the same "
                   "count on both sides) / median wall s/iter.")]
    lines += ["", "Phase split (median seconds per iteration over the measured iterations of all rounds):", "",
              "| phase | " + " | ".join(imp[n]["label"] for n in IMPLS if n in imp) + " |",
              "|---|" + "---|" * sum(n in imp for n in IMPLS)]
    for k in PHASE_GROUPS:
        lines.append(f"| {k} | " + " | ".join(f"{imp[n]['phase_groups_s_median'][k]:.4f}" for n in IMPLS if n in imp) + " |")
    lines += ["", ("Ours: the trainer's own `timings` (`generate`; `experience` = `reward` + `forwards` (here the "
                   "reference only) + the rest (KL, group advantages); `update`: the policy forward, backward, clip, Adam, "
                   "statistics) and `rest` = the rest of `step` (experience statistics). TRL: wrappers in its worker; "
                   "its `update` = " + " + ".join(TRL_UPDATE) + ". TRL's own split:")]
    for n in ("trl_grpo", "trl_rloo"):
        if n in imp:
            lines.append(f"- {imp[n]['label']}: " + ", ".join(f"{k} {v:.4f}" for k, v in imp[n]["phase_s_median"].items())
                         + (f" (calls per iteration: {imp[n]['calls_per_iter']})" if imp[n].get("calls_per_iter") else ""))
    chk = res.get("identity_checks", {})
    if chk:
        lines += ["", "Identical-setup checks (round-1 dumps, every iteration of the run):", ""]
        for algo, c in chk.items():
            lines.append(
                f"- {algo.upper()}: {c['iterations_compared']} iterations; prompt token ids (per row, unpadded) differ in "
                f"{c['iterations_with_different_prompt_ids']}; sequences per iteration {c['sequences']} (equal: "
                f"{c['sequences_equal']}); padded prompt columns equal: {c['prompt_columns_equal']}; response columns "
                f"ours {c['response_columns'][0]}, TRL {c['response_columns'][1]} (equal in every iteration: "
                f"{c['response_columns_equal']}); real response tokens per iteration (mean, up to EOS) ours / TRL "
                f"{c['response_tokens_mean'][0]} / {c['response_tokens_mean'][1]}; share of replies that ended with EOS "
                f"{c['terminated_share'][0]} / {c['terminated_share'][1]}. **Same setup: {c['same_setup']}.**")
    lines += ["", "What differs between the two sides, and cannot be made equal without changing either library:", ""]
    lines += [f"- **{k}.** {v}" for k, v in UNAVOIDABLE]
    prof = res.get("profiles", {})
    if prof:
        lines += ["", (f"torch.profiler of the measured iterations ({res.get('profile_iters')} iterations after "
                       f"{res['warmup']} warm-up; separate diagnostic runs, never timed; the profiler adds overhead "
                       f"per op, so read the order and the shares, not the seconds): top {PROFILE_ROWS} ops by self "
                       "CPU time.")]
        for name, rows in prof.items():
            lines += ["", f"{imp.get(name, {}).get('label', name)}:", "", "```", *rows, "```"]
    lines += ["", "Versions: " + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in imp[n]["versions"].items())
                                          for n in ("ours_grpo", "trl_grpo") if n in imp), ""]
    lines += [("Notes: one iteration = the wall time of one `CriticFreeTrainer.step` (ours) or between consecutive "
               "`on_step_end` callbacks (TRL), so each side's loop counts. TRL's GRPOConfig / RLOOConfig default "
               "`gradient_checkpointing=True` and `bf16=True`; both are off here (fp32, no checkpointing, like ours). The machine is shared: "
               "absolute seconds move with the load; compare the ratios."), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", choices=list(IMPLS), default=None, help="subset of implementations")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler diagnostic runs")
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--before", default=None, help="also run our workers at this earlier commit, in every round")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_grpo_rloo_vs_trl.json"))
    args = ap.parse_args()

    names = args.only or list(IMPLS)
    tree = common.checkout(args.before) if args.before else None
    befores = [f"{o}_before" for o, _ in PAIRS.values() if tree is not None and o in names]
    load_start, t0 = common.loadavg(), time.perf_counter()
    snap_start = common.load_snapshot()
    print(f"load at start: {snap_start['uptime']}; busy: {snap_start.get('busy_processes')}", flush=True)
    art = common.build_artifacts()
    vocab = json.loads((art / "setup.json").read_text())["vocab_size"]
    scratch = common.WORK / "runs-grpo-rloo"
    scratch.mkdir(parents=True, exist_ok=True)
    raw: dict[str, list[dict]] = {n: [] for n in names + befores}
    dumps: dict[str, dict] = {}
    for rnd in range(args.rounds):
        order = [n for o, t in PAIRS.values() for n in ((o, t) if rnd % 2 == 0 else (t, o)) if n in names]
        print(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}", flush=True)
        for n in order:
            extra = ["--dump", str(scratch / f"{n}_dump.json")] if rnd == 0 else []
            raw[n].append(run_worker(n, art, scratch / f"{n}_r{rnd}.json", args.warmup, args.iters, extra))
            if rnd == 0:
                dumps[n] = json.loads((scratch / f"{n}_dump.json").read_text())
            if f"{n}_before" in befores:  # the same worker at the earlier commit, right after ours
                b = f"{n}_before"
                raw[b].append(run_worker(b, art, scratch / f"{b}_r{rnd}.json", args.warmup, args.iters, [], tree))
    profiles: dict[str, list[str]] = {}
    if not args.no_profile:
        print("torch.profiler diagnostic runs (not timed)", flush=True)
        for n in names:
            p = scratch / f"{n}_profile.txt"
            run_worker(n, art, scratch / f"{n}_profile.json", args.warmup, args.profile_iters, ["--profile", str(p)])
            profiles[n] = profile_rows(p.read_text(), PROFILE_ROWS)
    snap_end = common.load_snapshot()
    impls = {n: merge(n, raw[n]) for n in [*IMPLS, *befores] if n in raw}
    res = {
        **common.run_header("cpu_grpo_rloo_vs_trl", load_start, t0),
        "load_start": snap_start,
        "load_end": snap_end,
        "setup": common.SETUP,
        "vocab_size": vocab,
        "artifacts": str(art.relative_to(common.REPO)),
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "env": common.THREAD_ENV,
        "implementations": impls,
        "goal": GOAL,
    }
    checks, ratios = {}, {}
    for algo, (o, t) in PAIRS.items():
        if o in dumps and t in dumps:
            checks[algo] = check_identity(dumps[o], dumps[t])
        if o in impls and t in impls:
            a, b = impls[o], impls[t]
            rr = common.ratio(a, b, raw[o], raw[t])
            rr["tokens_per_s"] = round(a["generated_tokens_per_s"] / b["generated_tokens_per_s"], 3)
            rr["meets_goal"] = rr["wall"] <= GOAL
            ratios[algo] = rr
    for algo, (o, t) in PAIRS.items():
        b = f"{o}_before"
        if b in impls and t in impls:
            ratios.setdefault(algo, {})["before_wall"] = round(impls[b]["median_s_per_iter"] / impls[t]["median_s_per_iter"], 3)
            ratios[algo]["before_wall_per_round"] = [round(x["median_s_per_iter"] / y["median_s_per_iter"], 3)
                                                     for x, y in zip(raw[b], raw[t])]
    if befores:
        res["before_rev"] = args.before
    if checks:
        res["identity_checks"] = checks
    if ratios:
        res["ratios"] = ratios
    if profiles:
        res["profiles"], res["profile_iters"] = profiles, args.profile_iters
    res["raw_runs"] = {n: raw[n] for n in IMPLS if n in raw}
    out = Path(args.out)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")
    for algo, rr in ratios.items():
        print(f"{algo}: ours / TRL = {rr['wall']:.3f} wall (per round {rr['wall_per_round']}), "
              f"{rr.get('cpu')} CPU (per round {rr.get('cpu_per_round')})")
    for algo, c in checks.items():
        print(f"check {algo}: {json.dumps(c)}")


if __name__ == "__main__":
    main()
