"""CPU scaling of rlhf_book PPO: seconds per iteration vs response length and model width.

    python benchmarks/run_cpu_scaling.py          # ~4-6 min on 2 cores

Same setup as run_cpu_ppo_vs_trl.py (4 layers, 4 heads, 16 sequences, 1 epoch, 1 minibatch,
separate critic, 2 threads, fp32), varying one thing at a time:
  * response length 16, 32, 64, 128 new tokens at width 256;
  * width 128, 256, 512 at 24 new tokens.
Each point is its own worker subprocess (workers/ours_ppo.py) with the phase split
(generation / critic+reference forwards / reward / update). Writes
benchmarks/results/cpu_scaling.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from run_cpu_ppo_vs_trl import run_worker  # noqa: E402

LENGTHS = [16, 32, 64, 128]
WIDTHS = [128, 256, 512]


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x: y ~ x^k."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def row(r: dict, key: str) -> dict:
    ph = r["phase_s_median"]
    value = r["config"]["n_embd"] if key == "width" else r["config"]["response_length"]
    return {key: value,
            "median_s_per_iter": r["median_s_per_iter"], "median_cpu_s_per_iter": r.get("median_cpu_s_per_iter"),
            "generated_tokens_per_s": r["generated_tokens_per_s"],
            "peak_rss_mib": r["peak_rss_mib"], **{f"{k}_s": v for k, v in ph.items()},
            "loadavg": [r["loadavg_start"][0], r["loadavg_end"][0]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_scaling.json"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from an existing --out JSON")
    args = ap.parse_args()
    if args.markdown_only:
        out = Path(args.out)
        write_markdown(json.loads(out.read_text()), out.with_suffix(".md"))
        return
    S = common.SETUP
    load_start, t0 = common.loadavg(), time.perf_counter()
    scratch = common.WORK / "runs"
    scratch.mkdir(parents=True, exist_ok=True)

    length_rows, width_rows = [], []
    art = common.build_artifacts(S["n_layer"], S["n_embd"], S["n_head"])
    print(f"response length sweep (width {S['n_embd']})", flush=True)
    for R in LENGTHS:
        r = run_worker("ours_ppo", art, scratch / f"scale_R{R}.json", args.warmup, args.iters, ["--response-length", str(R)])
        length_rows.append(row(r, "response_length"))
    print(f"width sweep ({S['response_length']} new tokens)", flush=True)
    for W in WIDTHS:
        art_w = common.build_artifacts(S["n_layer"], W, S["n_head"])
        r = run_worker("ours_ppo", art_w, scratch / f"scale_W{W}.json", args.warmup, args.iters, [])
        rr = row(r, "width")
        rr["parameters_per_model_M"] = round((12 * W * W * S["n_layer"] + (S["vocab_size"] + S["n_positions"]) * W) / 1e6, 2)
        width_rows.append(rr)

    k_len = fit_exponent([r["response_length"] for r in length_rows], [r["median_s_per_iter"] for r in length_rows])
    k_len_gen = fit_exponent([r["response_length"] for r in length_rows], [r["generate_s"] for r in length_rows])
    k_len_upd = fit_exponent([r["response_length"] for r in length_rows], [r["update_and_stats_s"] for r in length_rows])
    k_w = fit_exponent([r["width"] for r in width_rows], [r["median_s_per_iter"] for r in width_rows])
    k_w_gen = fit_exponent([r["width"] for r in width_rows], [r["generate_s"] for r in width_rows])
    k_w_upd = fit_exponent([r["width"] for r in width_rows], [r["update_and_stats_s"] for r in width_rows])
    res = {
        **common.run_header("cpu_scaling", load_start, t0),
        "setup": {**S, "critic": "separate (ValueModel.from_reward_model)"},
        "warmup": args.warmup,
        "iters": args.iters,
        "response_length_sweep": length_rows,
        "width_sweep": width_rows,
        "fitted_exponents": {"s_per_iter_vs_length": round(k_len, 2), "generation_vs_length": round(k_len_gen, 2),
                             "update_vs_length": round(k_len_upd, 2), "s_per_iter_vs_width": round(k_w, 2),
                             "generation_vs_width": round(k_w_gen, 2), "update_vs_width": round(k_w_upd, 2)},
    }
    out = Path(args.out)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")


def write_markdown(res: dict, path: Path) -> None:
    S, k = res["setup"], res["fitted_exponents"]
    upd = [r["update_and_stats_s"] for r in res["width_sweep"]]
    tot = [r["median_s_per_iter"] for r in res["response_length_sweep"]]
    fwd = [r["critic_ref_forwards_gae_s"] for r in res["response_length_sweep"]]
    gen = [r["generate_s"] for r in res["width_sweep"]]
    hdr = "| {} | s/iter | CPU s/iter | gen tokens/s | generation s | critic+ref fwd s | reward s | update s | peak RSS MiB | load 1-min |"
    sep = "|---|---|---|---|---|---|---|---|---|---|"

    def line(r, key):
        return (f"| {r[key]} | {r['median_s_per_iter']:.3f} | {r['median_cpu_s_per_iter']:.3f} | {r['generated_tokens_per_s']} | {r['generate_s']:.3f} | "
                f"{r['critic_ref_forwards_gae_s']:.3f} | {r['reward_fn_s']:.3f} | {r['update_and_stats_s']:.3f} | "
                f"{r['peak_rss_mib']:.0f} | {r['loadavg'][0]}-{r['loadavg'][1]} |")

    lines = [
        "# CPU scaling of rlhf_book PPO",
        "",
        (f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}), shared "
        f"(load average start/end {res['loadavg_start']} / {res['loadavg_end']}). {S['threads']} threads, fp32, "
        f"{S['n_layer']} layers, {S['n_head']} heads, {S['batch_size']} sequences/iteration, 1 epoch x 1 minibatch, "
        f"separate critic; {res['warmup']} warm-up + {res['iters']} measured iterations per point (median)."),
        "",
        f"Command: `{res['command']}`",
        "",
        f"## Response length (width {S['n_embd']})",
        "",
        hdr.format("new tokens"), sep,
        *[line(r, "response_length") for r in res["response_length_sweep"]],
        "",
        (f"Fitted s/iter ~ length^{k['s_per_iter_vs_length']} (generation ^{k['generation_vs_length']}, "
        f"update ^{k['update_vs_length']})."),
        "",
        f"## Width ({S['response_length']} new tokens)",
        "",
        hdr.format("width"), sep,
        *[line(r, "width") for r in res["width_sweep"]],
        "",
        f"Fitted s/iter ~ width^{k['s_per_iter_vs_width']} (generation ^{k['generation_vs_width']}, "
        f"update ^{k['update_vs_width']}). Parameters per model: "
        + ", ".join(f"{r['width']}: {r['parameters_per_model_M']}M" for r in res["width_sweep"]) + ".",
        "",
        "## How the cost grows, and why",
        "",
        ("* **Response length.** Generation is one sequential decode step per new token (16 sequences x 1 token "
        "through the whole model), so it grows linearly with the length; at this size each step is dominated by "
        "fixed per-step work (dozens of small ops per layer, KV-cache appends), not by FLOPs. The scoring forwards "
        "(reference, critic, reward) and the update (policy + critic forward and backward) process prompt + "
        "response columns (prompts left-padded to 14-16 tokens, plus R), so they grow like (15 + R): sub-linear in R while the prompt is a large "
        "share, approaching linear as R grows. Measured per doubling of the length: the iteration "
        + ", ".join(f"{b / a:.2f}x" for a, b in zip(tot, tot[1:]))
        + ", the scoring forwards " + ", ".join(f"{b / a:.1f}x" for a, b in zip(fwd, fwd[1:]))
        + ". Where a doubling costs more than 2x, attention's T^2 term and the memory of the activations kept "
        "for backward (B x T x width per layer, B x R x vocab logits; see peak RSS) have started to matter."),
        ("* **Width.** Matmul FLOPs and the weights, gradients and Adam state of the four models (policy, "
        "reference, critic, reward) grow like width^2 (4x per doubling). Measured per doubling: the update "
        + ", ".join(f"{b / a:.1f}x" for a, b in zip(upd, upd[1:]))
        + ", generation " + ", ".join(f"{b / a:.1f}x" for a, b in zip(gen, gen[1:]))
        + ". The update is compute-bound and approaches width^2 as the matmuls grow; generation grows more "
        "slowly because its per-step overhead (hundreds of small ops per token) does not depend on the width. "
        "At small widths the fixed overheads dominate, so halving the width buys much less than 4x."),
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
