"""Our PPO before and after the speed work, in one run: the library at an earlier commit vs this tree.

    python benchmarks/run_cpu_before_after.py              # ~4 min on 2 cores
    python benchmarks/run_cpu_before_after.py --before b5d7c04 --rounds 3

The CPU benchmark's setup (common.SETUP, separate critic). Three variants, each its own
worker subprocess with the identical environment, in rounds (before, after, after with
two sampling threads, then again) so drifts in the load hit all of them alike:

* ``before``: ``git archive <rev>`` unpacked into benchmarks/.work/rev-<rev>; its own
  workers/ours_ppo.py runs with PYTHONPATH pointing there, so it imports that rlhf_book;
* ``after``: this working tree's library and worker;
* ``after_2_sampling_threads``: this tree with ``generation_threads=None`` (sampling on
  the process's 2 threads), to separate the thread switch from everything else.

Writes benchmarks/results/cpu_before_after.json and .md.
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
from run_cpu_ppo_vs_trl import merge  # noqa: E402

DEFAULT_BEFORE = "b5d7c04"  # the last commit before the speed work


def checkout(rev: str) -> Path:
    """The tree of ``rev`` (library + benchmarks), unpacked once under benchmarks/.work."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=common.REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    dest = common.WORK / f"rev-{sha}"
    if not (dest / "rlhf_book").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "rlhf_book", "benchmarks"], cwd=common.REPO,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run(name: str, tree: Path, art: Path, out: Path, args, extra: list[str]) -> dict:
    """One worker run of ``tree``'s ours_ppo.py importing ``tree``'s rlhf_book."""
    cmd = [sys.executable, str(tree / "benchmarks" / "workers" / "ours_ppo.py"), "--artifacts", str(art),
           "--out", str(out), "--warmup", str(args.warmup), "--iters", str(args.iters), "--critic", "separate", *extra]
    env = common.worker_env({"PYTHONPATH": str(tree)})
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    res = json.loads(out.read_text())
    res["command"] = f"PYTHONPATH={tree} " + shlex.join(cmd)
    print(f"  {name:26s} {res['median_s_per_iter']:.3f} s/iter  cpu {res['median_cpu_s_per_iter']} s/iter  "
          f"phases {res['phase_s_median']}  ({time.perf_counter() - t:.0f} s)", flush=True)
    return res


def write_markdown(res: dict, path: Path) -> None:
    v = res["variants"]
    b = v["before"]
    lines = [
        "# CPU benchmark: our PPO before and after the speed work",
        "",
        f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}), load average at "
        f"start/end {res['loadavg_start']} / {res['loadavg_end']}. Setup: the CPU benchmark's (4 x 256 GPT-2, 16 x 24 "
        "new tokens, 1 epoch, 1 minibatch, separate critic, 2 threads, fp32).",
        "",
        f"Command: `{res['command']}`. Before = the library at commit `{res['before_rev']}`; after = this tree.",
        "",
        "| variant | median s/iter (wall) | median CPU s/iter | generate | critic + ref forwards, GAE | reward_fn | update | vs before (wall) | vs before (CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v.items():
        ph = r["phase_s_median"]
        lines.append(
            f"| {name} | {r['median_s_per_iter']} | {r['median_cpu_s_per_iter']} | {ph['generate']} | "
            f"{ph['critic_ref_forwards_gae']} | {ph['reward_fn']} | {ph['update_and_stats']} | "
            f"{r['median_s_per_iter'] / b['median_s_per_iter']:.2f} | {r['median_cpu_s_per_iter'] / b['median_cpu_s_per_iter']:.2f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=DEFAULT_BEFORE)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_before_after.json"))
    args = ap.parse_args()
    load_start, t0 = common.loadavg(), time.perf_counter()
    S = common.SETUP
    art = common.build_artifacts(S["n_layer"], S["n_embd"], S["n_head"])
    old = checkout(args.before)
    scratch = common.WORK / "runs"
    scratch.mkdir(parents=True, exist_ok=True)
    variants = {"before": (old, []), "after": (common.REPO, []), "after_2_sampling_threads": (common.REPO, ["--generation-threads", "0"])}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", flush=True)
        for name, (tree, extra) in variants.items():
            runs[name].append(run(name, tree, art, scratch / f"ba_{name}_{rnd}.json", args, extra))
    res = {**common.run_header("cpu_before_after", load_start, t0), "before_rev": args.before,
           "variants": {k: merge(v) for k, v in runs.items()}}
    out = Path(args.out)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    b, a = res["variants"]["before"], res["variants"]["after"]
    print(f"wrote {out} and {out.with_suffix('.md')}; after / before = {a['median_s_per_iter'] / b['median_s_per_iter']:.2f} wall, "
          f"{a['median_cpu_s_per_iter'] / b['median_cpu_s_per_iter']:.2f} CPU")


if __name__ == "__main__":
    main()
