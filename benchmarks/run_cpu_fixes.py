"""CPU experiment: how much two environment/config fixes buy, for ours and for TRL PPO alike.

    python benchmarks/run_cpu_fixes.py            # ~4-5 min on 2 cores

Variants (each a fresh worker subprocess, ours and TRL interleaved):
  stock       what run_cpu_ppo_vs_trl.py measures
  mallopt     glibc keeps freed tensor memory (common.apply_mallopt: M_MMAP_THRESHOLD 32 MiB,
              M_TRIM_THRESHOLD 512 MiB) instead of mmap/munmap + page faults per large temporary
  fused_gelu  GPT2Config.activation_function="gelu_pytorch_tanh" (one fused kernel; the same
              tanh approximation as the default "gelu_new", which runs as ~8 separate ops)
  both        the two together
Separate processes cannot resolve a 10% effect on a shared machine whose load drifts, so the
fused-GELU change (and, for scale, the critic choice) is also measured in-process:
workers/ours_ab.py alternates iterations of a stock and a changed PPOTrainer.
Writes benchmarks/results/cpu_fixes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from run_cpu_ppo_vs_trl import run_worker  # noqa: E402

VARIANTS = {
    "stock": [],
    "mallopt": ["--mallopt"],
    "fused_gelu": ["--activation", "gelu_pytorch_tanh"],
    "both": ["--mallopt", "--activation", "gelu_pytorch_tanh"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--ab-iters", type=int, default=10)
    ap.add_argument("--impls", nargs="*", default=["ours_ppo", "trl_ppo"])
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_fixes.json"))
    args = ap.parse_args()
    load_start, t0 = common.loadavg(), time.perf_counter()
    art = common.build_artifacts()
    scratch = common.WORK / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    ab = {}
    for variant in ("fused_gelu", "value_head"):
        out_ab = scratch / f"ab_{variant}.json"
        cmd = [sys.executable, str(common.HERE / "workers" / "ours_ab.py"), "--artifacts", str(art), "--out", str(out_ab),
               "--variant", variant, "--warmup", str(args.warmup), "--iters", str(args.ab_iters)]
        subprocess.run(cmd, env=common.worker_env(), cwd=common.REPO, check=True)
        ab[variant] = json.loads(out_ab.read_text())
        ab[variant]["command"] = shlex.join(cmd)
    table: dict[str, dict] = {}
    for v, flags in VARIANTS.items():
        print(f"variant {v}", flush=True)
        for impl in args.impls:
            r = run_worker(impl, art, scratch / f"fix_{v}_{impl}.json", args.warmup, args.iters, flags)
            table.setdefault(v, {})[impl] = {
                "median_s_per_iter": r["median_s_per_iter"], "median_cpu_s_per_iter": r.get("median_cpu_s_per_iter"),
                "generated_tokens_per_s": r["generated_tokens_per_s"],
                "peak_rss_mib": r["peak_rss_mib"], "phase_s_median": r.get("phase_s_median"), "variant": r.get("variant"),
                "loadavg": [r["loadavg_start"][0], r["loadavg_end"][0]],
            }
    res = {"benchmark": "cpu_fixes", "date": common.now(), "machine": common.machine_info(), "loadavg_start": load_start,
           "loadavg_end": common.loadavg(), "total_wall_s": round(time.perf_counter() - t0, 1),
           "command": shlex.join([Path(sys.executable).name, *sys.argv]), "setup": common.SETUP,
           "warmup": args.warmup, "iters": args.iters, "in_process_ab": ab, "variants": table}
    out = Path(args.out)
    common.write_json(out, res)
    lines = ["# CPU experiment: allocator and fused-GELU fixes", "",
             (f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}), shared "
             f"(load average start/end {load_start} / {res['loadavg_end']}). Same setup as cpu_ppo_vs_trl; "
             f"{args.warmup} warm-up + {args.iters} measured iterations per cell, one run per cell."), "",
             f"Command: `{res['command']}`", "",
             "## In-process A/B (alternating iterations of two PPOTrainers in one process)", "",
             ("| B (A = stock: gelu_new, separate critic) | A wall s/iter | B wall s/iter | A CPU s/iter | B CPU s/iter "
             "| B/A wall | B/A CPU | median pairwise B/A wall | load 1-min |"),
             "|---|---|---|---|---|---|---|---|---|",
             *[f"| {r['B']} | {r['median']['A']['wall']:.3f} | {r['median']['B']['wall']:.3f} | {r['median']['A']['cpu']:.3f} "
               f"| {r['median']['B']['cpu']:.3f} | {r['ratio_B_over_A_wall']:.2f} | {r['ratio_B_over_A_cpu']:.2f} "
               f"| {r['median_pairwise_ratio_wall']:.2f} | {r['loadavg_start'][0]}-{r['loadavg_end'][0]} |" for r in ab.values()],
             "", "## Separate processes (one run per cell; includes peak RSS and TRL)", "",
             "| variant | " + " | ".join(f"{i} wall s/iter | {i} CPU s/iter | {i} CPU vs stock | {i} peak RSS MiB"
                                      for i in args.impls) + " | ours / TRL (CPU) | load 1-min |",
             "|---|" + "---|" * (4 * len(args.impls) + 2)]
    for v, row in table.items():
        cells = []
        for i in args.impls:
            c, c0 = row[i]["median_cpu_s_per_iter"], table["stock"][i]["median_cpu_s_per_iter"]
            cells += [f"{row[i]['median_s_per_iter']:.3f}", f"{c:.3f}", f"{c / c0:.2f}", f"{row[i]['peak_rss_mib']:.0f}"]
        ratio = (f"{row['ours_ppo']['median_cpu_s_per_iter'] / row['trl_ppo']['median_cpu_s_per_iter']:.2f}"
                 if {"ours_ppo", "trl_ppo"} <= set(row) else "-")
        loads = ", ".join(f"{row[i]['loadavg'][0]}" for i in args.impls)
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {ratio} | {loads} |")
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
