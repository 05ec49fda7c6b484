"""CPU benchmark: rlhf_book PPO vs TRL 1.12 PPO (and TRL 1.16 GRPO / RLOO for context).

    python benchmarks/run_cpu_ppo_vs_trl.py            # ~5 min on 2 cores; creates the TRL venvs on first use

One process tree, one session: this orchestrator (system Python, rlhf_book installed)
builds the shared artefacts, then launches every implementation in its own subprocess,
one after another, with the identical environment (OMP_WAIT_POLICY=PASSIVE, 2 threads).
Each worker writes a JSON; this script merges them into
benchmarks/results/cpu_ppo_vs_trl.json and .md.

``--rounds N`` repeats the whole sequence N times (ours, TRL, ... then again) so slow
drifts in the load of a shared machine hit every implementation alike; the reported
median pools the measured iterations of all rounds.

``--before REV`` adds our workers at an earlier commit (``git archive REV`` under
benchmarks/.work, imported through PYTHONPATH) to every
round, so a change to the library is judged by its ratio to TRL before and after, measured
in one run on the same load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORKERS = common.HERE / "workers"

IMPLS = {
    # name: (python, script, extra args)
    "ours_ppo": ("main", "ours_ppo.py", ["--critic", "separate"]),
    "trl_ppo": ("trl112", "trl_ppo.py", []),
    "trl_ppo_no_gc": ("trl112", "trl_ppo.py", ["--no-gc"]),  # diagnostic: TRL minus its per-iteration gc.collect()
    "ours_ppo_value_head": ("main", "ours_ppo.py", ["--critic", "head"]),
    "trl_grpo": ("trl116", "trl_grpo_rloo.py", ["--algo", "grpo"]),
    "trl_rloo": ("trl116", "trl_grpo_rloo.py", ["--algo", "rloo"]),
}
HEADLINE = ("ours_ppo", "trl_ppo")




BEFORE = {"ours_ppo_before": "ours_ppo", "ours_ppo_value_head_before": "ours_ppo_value_head"}  # --before REV


def run_worker(name: str, art: Path, out: Path, warmup: int, iters: int, extra: list[str],
               tree: Path | None = None) -> dict:
    """One worker run; ``tree``: the unpacked tree of an earlier commit whose rlhf_book and worker are used instead."""
    kind, script, args = IMPLS[BEFORE.get(name, name)]
    workers = WORKERS if tree is None else tree / "benchmarks" / "workers"
    cmd = [common.python_for(kind), str(workers / script), "--artifacts", str(art), "--out", str(out),
           "--warmup", str(warmup), "--iters", str(iters), *args, *extra]
    env = common.worker_env() if tree is None else common.worker_env({"PYTHONPATH": str(tree)})
    res = common.launch(name, cmd, out, env, common.REPO if tree is None else tree)
    wall = res["wall_s"]
    if tree is not None:
        res["command"] = f"PYTHONPATH={tree} " + res["command"]
    if tree is not None:
        res["label"] += f" at {tree.name.removeprefix('rev-')} (before)"
    print(f"  {name:22s} {res['median_s_per_iter']:.3f} s/iter  cpu {res.get('median_cpu_s_per_iter')} s/iter  "
          f"{res.get('generated_tokens_per_s')} tok/s  "
          f"RSS {res['peak_rss_mib']:.0f} MiB  load {res['loadavg_start'][0]}->{res['loadavg_end'][0]}  ({wall:.0f} s)",
          flush=True)
    return res


def merge(runs: list[dict]) -> dict:
    """Pool the measured iterations of every round of one implementation."""
    out = common.pooled(runs)
    tok = runs[0].get("generated_tokens_per_iter")
    gen = [r["generation_s_median"] for r in runs if r.get("generation_s_median")]
    out.update(generated_tokens_per_iter=tok,
               generated_tokens_per_s=round(tok / out["median_s_per_iter"], 1) if tok else None,
               generation_s_median=round(common.median(gen), 4) if gen else None)
    if "phase_s_median" in runs[0]:
        out["phase_s_median"] = {k: round(common.median([r["phase_s_median"][k] for r in runs]), 4)
                                 for k in runs[0]["phase_s_median"]}
    return out


def write_markdown(res: dict, path: Path) -> None:
    S = res["setup"]
    imp = res["implementations"]
    lines = [
        "# CPU benchmark: rlhf_book PPO vs TRL PPO",
        "",
        (f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}), "
        f"{res['machine']['mem_gib']} GiB, shared with other jobs (load average at start/end of the whole run: "
        f"{res['loadavg_start']} / {res['loadavg_end']}). Threads: {S['threads']}, OMP_WAIT_POLICY=PASSIVE, fp32."),
        "",
        (f"Setup: random-init GPT-2 ({S['n_layer']} layers, width {S['n_embd']}, {S['n_head']} heads, vocab "
        f"{res['vocab_size']}), tokenizer = `rlhf_book.train_tokenizer` on the corpus, {S['n_prompts']} corpus prompts, "
        f"{S['batch_size']} sequences/iteration, {S['response_length']} new tokens, {S['ppo_epochs']} PPO epoch, "
        f"{S['minibatches']} minibatch; reward = one random-init GPT2ForSequenceClassification (same weights for all); "
        f"{res['warmup']} warm-up + {res['iters']} measured iterations per run, {res['rounds']} round(s)."),
        "",
        f"Command: `{res['command']}`",
        "",
        "| implementation | median s/iter (wall) | median CPU s/iter | generated tokens/s | generation s/iter | peak RSS (MiB) | ours / this (wall) | ours / this (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = imp.get("ours_ppo", {}).get("median_s_per_iter")
    ours_cpu = imp.get("ours_ppo", {}).get("median_cpu_s_per_iter")
    for name, r in imp.items():
        ratio = f"{ours / r['median_s_per_iter']:.2f}" if ours else "-"
        cratio = f"{ours_cpu / r['median_cpu_s_per_iter']:.2f}" if ours_cpu and r.get("median_cpu_s_per_iter") else "-"
        lines.append(f"| {r['label']} | {r['median_s_per_iter']:.3f} | {r['median_cpu_s_per_iter']} | {r['generated_tokens_per_s']} | "
                     f"{r['generation_s_median']} | {r['peak_rss_mib']:.0f} | {ratio} | {cratio} |")
    if "ratio_ours_over_trl_ppo" in res:
        lines += ["", (f"**ours / TRL PPO, wall s/iter (lower is better for ours): {res['ratio_ours_over_trl_ppo']:.2f}** "
                  f"(per round: {res['ratio_per_round']}); CPU s/iter: {res['cpu_ratio_ours_over_trl_ppo']} "
                  f"(per round: {res['cpu_ratio_per_round']}). Peak RSS ours / TRL: {res['rss_ratio_ours_over_trl_ppo']:.2f}.")]
    if "ratio_before_over_trl_ppo" in res:
        lines += ["", (f"**Before / after** (our library at `{res['before_rev']}` vs this tree, same rounds): ours / TRL PPO "
                  f"wall {res['ratio_before_over_trl_ppo']:.2f} before (per round: {res['ratio_before_per_round']}) and "
                  f"{res.get('ratio_ours_over_trl_ppo', float('nan')):.2f} after; CPU "
                  f"{res.get('cpu_ratio_before_over_trl_ppo')} before, {res.get('cpu_ratio_ours_over_trl_ppo')} after.")]
    lines += ["", ("Phase split (median seconds per iteration; ours: the trainer's own `timings`, before: wrappers in "
                   "that commit's worker; TRL: wrappers in the workers):"), ""]
    for name in ("ours_ppo_before", "ours_ppo", "trl_ppo", "trl_ppo_no_gc", "ours_ppo_value_head_before",
                 "ours_ppo_value_head"):
        if "phase_s_median" in imp.get(name, {}):
            lines.append(f"- {imp[name]['label']}: " + ", ".join(f"{k} {v:.3f}" for k, v in imp[name]["phase_s_median"].items()))
    lines += ["", "Versions: " + "; ".join(f"{n}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
                                          for n, r in imp.items() if n in ("ours_ppo_before", "ours_ppo", "trl_ppo", "trl_grpo")), ""]
    lines += [("Notes: TRL's PPOConfig defaults `gradient_checkpointing=True` and `bf16=True`; both are turned off here "
              "(fp32, no checkpointing, like ours). The `gc.collect() patched out` row is a diagnostic, not a TRL "
              "configuration: TRL's PPO loop calls gc.collect() twice per iteration. GRPO/RLOO use 4 prompts x 4 samples = 16 sequences, beta = the PPO KL "
              "coefficient (so the reference forward runs) and have no critic, so they do less work per iteration than "
              "PPO by design. The machine is shared: absolute seconds move with the load; compare ratios."), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=list(IMPLS), default=None, help="subset of implementations")
    ap.add_argument("--no-context", action="store_true", help="skip TRL 1.16 GRPO/RLOO")
    ap.add_argument("--before", default=None, help="also run our workers at this earlier commit, in every round")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_ppo_vs_trl.json"))
    args = ap.parse_args()

    names = args.only or [n for n in IMPLS if not (args.no_context and n in ("trl_grpo", "trl_rloo"))]
    trees: dict[str, Path] = {}
    if args.before:

        tree = common.checkout(args.before)
        for before, after in BEFORE.items():
            if after in names:
                names.insert(names.index(after), before)
                trees[before] = tree
    load_start, t0 = common.loadavg(), time.perf_counter()
    art = common.build_artifacts()
    vocab = json.loads((art / "setup.json").read_text())["vocab_size"]
    scratch = common.WORK / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    raw: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        for n in names:
            raw[n].append(run_worker(n, art, scratch / f"{n}_r{rnd}.json", args.warmup, args.iters, [], trees.get(n)))
    impls = {n: merge(rs) for n, rs in raw.items()}
    res = {
        **common.run_header("cpu_ppo_vs_trl", load_start, t0),
        "setup": common.SETUP,
        "vocab_size": vocab,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "env": common.THREAD_ENV,
        "implementations": impls,
        "raw_runs": raw,
    }
    if all(h in impls for h in HEADLINE):
        o, t = impls["ours_ppo"], impls["trl_ppo"]
        res["ratio_ours_over_trl_ppo"] = round(o["median_s_per_iter"] / t["median_s_per_iter"], 3)
        res["ratio_per_round"] = [round(a["median_s_per_iter"] / b["median_s_per_iter"], 3)
                                  for a, b in zip(raw["ours_ppo"], raw["trl_ppo"])]
        if o["median_cpu_s_per_iter"] and t["median_cpu_s_per_iter"]:
            res["cpu_ratio_ours_over_trl_ppo"] = round(o["median_cpu_s_per_iter"] / t["median_cpu_s_per_iter"], 3)
            res["cpu_ratio_per_round"] = [round(a["median_cpu_s_per_iter"] / b["median_cpu_s_per_iter"], 3)
                                          for a, b in zip(raw["ours_ppo"], raw["trl_ppo"])]
        res["rss_ratio_ours_over_trl_ppo"] = round(o["peak_rss_mib"] / t["peak_rss_mib"], 3)
    if "ours_ppo_before" in impls and "trl_ppo" in impls:
        b, t = impls["ours_ppo_before"], impls["trl_ppo"]
        res["before_rev"] = args.before
        res["ratio_before_over_trl_ppo"] = round(b["median_s_per_iter"] / t["median_s_per_iter"], 3)
        res["ratio_before_per_round"] = [round(a["median_s_per_iter"] / c["median_s_per_iter"], 3)
                                         for a, c in zip(raw["ours_ppo_before"], raw["trl_ppo"])]
        if b["median_cpu_s_per_iter"] and t["median_cpu_s_per_iter"]:
            res["cpu_ratio_before_over_trl_ppo"] = round(b["median_cpu_s_per_iter"] / t["median_cpu_s_per_iter"], 3)
    out = Path(args.out)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")
    if "ratio_ours_over_trl_ppo" in res:
        print(f"ours / TRL PPO = {res['ratio_ours_over_trl_ppo']:.2f} wall (per round {res['ratio_per_round']}), "
              f"{res.get('cpu_ratio_ours_over_trl_ppo')} CPU (per round {res.get('cpu_ratio_per_round')})")


if __name__ == "__main__":
    main()
