"""GPU benchmark: rlhf_book PPO vs TRL 1.12 PPO on a GPT-2-small sized model, and the full pipeline's wall time.

    bash benchmarks/setup_venvs.sh            # once: the TRL venv (CUDA torch on a GPU machine; see README)
    python benchmarks/run_gpu.py              # a CUDA GPU (H100 / H200); -> benchmarks/results/gpu_ppo_vs_trl.{json,md}
    python benchmarks/run_gpu.py --smoke      # a CPU, tiny sizes, ~30 s: proves the harness end to end

Part ``ppo`` (ours vs TRL, each in its own subprocess with the same environment, like
run_cpu_ppo_vs_trl.py): random-init GPT-2 small (12 layers, width 768, 12 heads, 1024
positions, vocab 50257: 124.4M parameters) as policy and reference, and a
GPT2ForSequenceClassification of the same shape as reward model and as critic (the project's
tokenizer has 1024 ids: the other rows are masked, see mask_unused_vocab); 64 sequences
of 64 new tokens per iteration, 1 PPO epoch, 1 minibatch, bf16 autocast on both sides,
2 warm-up + 10 measured iterations. Reported per implementation (sums over the measured
iterations unless "median"):

* s/iter: median wall seconds of one PPO iteration (torch.cuda.synchronize() before each clock read);
* generation tokens/s = B x new tokens / generation seconds;
* training tokens/s = B x (prompt + response columns) x epochs / update seconds;
* model FLOPs per iteration (the same formula for both sides; attention's T^2 term, ~1% here, left out):
    2 N_lm (T-1) B       generation (prompt prefill + one position per new token)
  + 2 N_lm T B           reference forward
  + 2 N_cls T B          reward-model forward
  + 6 (N_lm + N_cls) T B x epochs   update: forward + backward of policy and separate critic
  with N_lm = the LM's parameters minus the position embeddings (the tied token embedding counts
  once, as the LM-head matmul) and N_cls = a classifier's parameters minus both embeddings;
* MFU = model FLOPs / (seconds x peak FLOP/s): of the whole iteration, and of the update alone
  (its 6 N T B x epochs over the update seconds); the peak is the dense bf16 (or TF32 with fp32)
  tensor-core number of the device (PEAK_TFLOPS, or --peak-tflops), else n/a;
* peak GPU memory (torch.cuda.max_memory_allocated, and _reserved) of each worker process.

Part ``pipeline``: ``python -m rlhf_book.cli pipeline --config configs/ppo_gpu.toml`` with
$RLHF_BOOK_CACHE in a fresh directory, so the base LM and the reward model are trained from
scratch; each of the three stages is timed from the CLI's "[k/3]" lines.

``--smoke`` runs the same code on the CPU at tiny sizes (2 layers x 64, vocab 1280, 4
sequences x 8 new tokens, 1 warm-up + 2 iterations, fp32, configs/ppo_tiny.toml with 2 PPO
iterations) and writes to benchmarks/.work/smoke/, never to results/. It exits 0 only if every
part produced its numbers. Without --smoke the script refuses to run (exit 2) without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
SMOKE_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256, "vocab_size": 1280}  # > 1024: the masking runs

# Dense (no 2:4 sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Keyed by a
# substring of torch.cuda.get_device_name(); the first match wins ("fp32" = TF32, which
# both sides switch on). H100 SXM reports itself as "NVIDIA H100 80GB HBM3".
PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp32": 494.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100 SXM", {"bf16": 989.0, "fp32": 494.0}),
    ("H100 80GB HBM3", {"bf16": 989.0, "fp32": 494.0}),
]

# name: (python, worker script, worker args, label). Default: the first two (--only for the others).
IMPLS = {
    "ours_ppo": ("main", "ours_ppo.py", ["--critic", "separate"], "rlhf_book PPOTrainer (separate critic)"),
    "trl_ppo": ("trl112", "trl_ppo.py", [], "TRL 1.12 experimental PPOTrainer"),
    "ours_ppo_compile": ("main", "ours_ppo.py", ["--critic", "separate", "--compile"],
                         "rlhf_book PPOTrainer (separate critic, compile=True)"),
    "trl_ppo_stock_bf16": ("trl112", "trl_ppo.py", ["--bf16-scope", "train"],
                           "TRL 1.12 PPOTrainer, bf16 as shipped (training forward only)"),
}
DEFAULT_IMPLS = ["ours_ppo", "trl_ppo"]


# ----------------------------------------------------------------------------- setup
def device_info(python: str) -> dict:
    """CUDA availability and device name as seen by ``python`` (a subprocess: this process never touches the GPU)."""
    code = ("import json, torch; ok = torch.cuda.is_available(); print(json.dumps({'cuda': ok, 'torch': torch.__version__, "
            "'torch_cuda': torch.version.cuda, 'name': torch.cuda.get_device_name() if ok else None, "
            "'capability': list(torch.cuda.get_device_capability()) if ok else None}))")
    proc = subprocess.run([python, "-c", code], env=common.worker_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"cuda": False, "error": proc.stderr.strip()[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_tflops(device_name: str | None, precision: str) -> float | None:
    for key, peaks in PEAK_TFLOPS:
        if device_name and key in device_name:
            return peaks[precision]
    return None


def mask_unused_vocab(lm, n_used: int, dim: int = 0) -> None:
    """Make token ids >= ``n_used`` (rows the tokenizer never produces) unsampleable, keeping every parameter.

    GPT-2's LM head is the token embedding (tied), without a bias. Pin one feature of the
    final layer norm's output to 1 (weight 0, bias 1) and give that feature of the unused
    embedding rows the value -1e4: their logits are then about -1e4 whatever the input, so
    sampling never picks them. Without this a random policy samples ids the tokenizer cannot
    decode (97% of a 50257-wide head), our text-based reward would see near-empty replies and
    TRL's id-based one full ones. The model keeps GPT-2 small's parameters and full-width head.
    """
    import torch

    with torch.no_grad():
        lm.transformer.ln_f.weight[dim] = 0.0
        lm.transformer.ln_f.bias[dim] = 1.0
        lm.transformer.wte.weight[n_used:, dim] = -1e4


def build_artifacts(model: dict) -> Path:
    """Tokenizer, prompts (those of the CPU benchmark) and random-init policy / reward / value weights of ``model``."""
    base = common.build_artifacts()  # the corpus tokenizer (vocab 1024) and the 64 prompts
    out = common.WORK / "gpu-L{n_layer}-W{n_embd}-H{n_head}-P{n_positions}-V{vocab_size}".format(**model)
    if (out / "setup.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base / "tokenizer", tmp / "tokenizer")
    shutil.copy(base / "prompts.json", tmp / "prompts.json")
    meta = json.loads((base / "setup.json").read_text())
    n_tok, pad, eos = meta["vocab_size"], meta["pad_token_id"], meta["eos_token_id"]
    if model["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size {model['vocab_size']} < the tokenizer's {n_tok} ids")
    S = common.SETUP
    cfg = GPT2Config(
        **model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad, num_labels=1,
    )
    torch.manual_seed(S["seed"])
    policy = GPT2LMHeadModel(cfg)
    if model["vocab_size"] > n_tok:
        mask_unused_vocab(policy, n_tok)
    policy.save_pretrained(tmp / "policy")
    torch.manual_seed(S["seed"] + 1)
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp / "reward")
    torch.manual_seed(S["seed"] + 2)
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp / "value")
    (tmp / "setup.json").write_text(json.dumps({**model, "tokenizer_size": n_tok, "n_prompts": meta["n_prompts"],
                                                "pad_token_id": pad, "eos_token_id": eos}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def flop_params(model: dict) -> dict:
    """Parameter counts of GPT-2 (Conv1D weights + biases, layer norms): total, and those that do matmuls per token."""
    L, d, V, P = model["n_layer"], model["n_embd"], model["vocab_size"], model["n_positions"]
    blocks = L * (12 * d * d + 13 * d) + 2 * d  # attention 4d^2+4d, MLP 8d^2+5d, two layer norms 4d; final norm 2d
    return {"total_lm": blocks + V * d + P * d,  # GPT2LMHeadModel: 124,439,808 for GPT-2 small
            "n_lm": blocks + V * d,  # position embeddings are a lookup; the tied token embedding is the LM head
            "n_cls": blocks + d}  # GPT2ForSequenceClassification: no LM head, score = d x 1


# ----------------------------------------------------------------------------- part 1: ours vs TRL
def run_worker(name: str, art: Path, out: Path, args, model_args: list[str]) -> dict:
    """One implementation in its own subprocess (common.worker_env); returns its JSON."""
    kind, script, impl_args, label = IMPLS[name]
    cmd = [common.python_for(kind), str(common.HERE / "workers" / script), "--artifacts", str(art), "--out", str(out),
           "--warmup", str(args.warmup), "--iters", str(args.iters), *impl_args, *model_args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=common.worker_env(), cwd=common.REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    res = json.loads(out.read_text())
    res.update(name=name, label=label, wall_s=round(time.perf_counter() - t, 1), command=shlex.join(cmd))
    return res


def iteration_flops(seq_tokens: int, train_tokens: int, batch: int, params: dict, separate_critic: bool) -> dict:
    """Model FLOPs of one PPO iteration by part (module docstring); seq_tokens = B x T, train_tokens = that x epochs."""
    n_lm, n_cls = params["n_lm"], params["n_cls"]
    return {"generation": 2 * n_lm * (seq_tokens - batch), "reference": 2 * n_lm * seq_tokens,
            "reward": 2 * n_cls * seq_tokens,
            "update": 6 * (n_lm + (n_cls if separate_critic else 0)) * train_tokens}


def summarize_impl(r: dict, params: dict, peak: float | None) -> dict:
    """Throughputs, model FLOP/s and MFU of one worker's measured iterations."""
    w, pi = r["warmup"], r["per_iter"]
    it_s, gen_s, upd_s = sum(r["iter_seconds"][w:]), sum(pi["generation_s"][w:]), sum(pi["update_s"][w:])
    epochs, batch = r["config"]["ppo_epochs"], r["config"]["batch_size"]
    separate = "PolicyWithValueHead" not in r["config"]["critic"]
    parts = [iteration_flops(t // epochs, t, batch, params, separate) for t in pi["train_tokens"][w:]]
    flops = {k: sum(p[k] for p in parts) for k in parts[0]}
    total = sum(flops.values())
    mfu = (lambda f, s: round(f / (s * peak * 1e12), 4) if peak and s > 0 else None)
    return {
        "label": r["label"], "median_s_per_iter": r["median_s_per_iter"], "min_s_per_iter": r["min_s_per_iter"],
        "generation_s_median": r["generation_s_median"], "update_s_median": round(common.median(pi["update_s"][w:]), 4),
        "generation_tokens_per_s": round(sum(pi["generated_tokens"][w:]) / gen_s, 1) if gen_s > 0 else None,
        "training_tokens_per_s": round(sum(pi["train_tokens"][w:]) / upd_s, 1) if upd_s > 0 else None,
        "train_tokens_per_iter": round(sum(pi["train_tokens"][w:]) / len(parts), 1),
        "model_gflop_per_iter": {k: sig(v / len(parts) / 1e9) for k, v in flops.items()},
        "model_tflop_per_s": sig(total / it_s / 1e12) if it_s > 0 else None,
        "mfu_iteration": mfu(total, it_s), "mfu_update": mfu(flops["update"], upd_s),
        "peak_gpu_mib": r.get("peak_gpu_mib"), "peak_gpu_reserved_mib": r.get("peak_gpu_reserved_mib"),
        "peak_rss_mib": r["peak_rss_mib"], "max_sampled_id": r.get("max_sampled_id"),
        "phase_s_median": r.get("phase_s_median"), "versions": r["versions"], "device_name": r.get("device_name"),
        "precision": r.get("precision"), "command": r["command"],
    }


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (the smoke sizes are 1e4 times smaller than the GPU ones)."""
    return float(f"{x:.{digits}g}")


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def run_ppo_part(args, scratch: Path) -> dict:
    model = SMOKE_MODEL if args.smoke else {**GPT2_SMALL, "vocab_size": args.vocab_size}
    art = build_artifacts(model)
    params = flop_params(model)
    model_args = ["--device", args.device, "--precision", args.precision,
                  "--batch-size", str(args.batch_size), "--response-length", str(args.new_tokens)]
    raw, impls = {}, {}
    for name in args.only:
        print(f"  {name} ...", flush=True)
        raw[name] = run_worker(name, art, scratch / f"{name}.json", args, model_args)
        peak = args.peak_tflops or peak_tflops(raw[name].get("device_name"), args.precision)
        impls[name] = s = summarize_impl(raw[name], params, peak)
        print(f"  {name:20s} {s['median_s_per_iter']:.3f} s/iter  gen {s['generation_tokens_per_s']} tok/s  "
              f"train {s['training_tokens_per_s']} tok/s  {s['model_tflop_per_s']} TFLOP/s  MFU {s['mfu_iteration']} "
              f"(update {s['mfu_update']})  peak GPU {s['peak_gpu_mib']} MiB  ({raw[name]['wall_s']:.0f} s)", flush=True)
    device_name = next(iter(raw.values())).get("device_name")
    part = {"model": model, "parameters": params,
            "tokenizer_size": json.loads((art / "setup.json").read_text())["tokenizer_size"],
            "batch_size": args.batch_size, "new_tokens": args.new_tokens, "ppo_epochs": common.SETUP["ppo_epochs"],
            "minibatches": common.SETUP["minibatches"], "precision": args.precision, "warmup": args.warmup,
            "iters": args.iters, "peak_tflops": args.peak_tflops or peak_tflops(device_name, args.precision),
            "implementations": impls, "raw_runs": raw}
    if "ours_ppo" in impls and "trl_ppo" in impls:
        o, t = impls["ours_ppo"], impls["trl_ppo"]
        part["ours_over_trl"] = {k: ratio(o[k], t[k]) for k in (
            "median_s_per_iter", "generation_tokens_per_s", "training_tokens_per_s", "model_tflop_per_s", "peak_gpu_mib")}
    return part


# ----------------------------------------------------------------------------- part 2: the pipeline
STAGES = ("[1/3]", "[2/3]", "[3/3]")


def run_pipeline_part(config: str, iterations: int | None, work: Path) -> dict:
    """Time ``rlhf_book.cli pipeline`` from a fresh cache; stage boundaries are the CLI's "[k/3]" lines."""
    cache, out = work / "cache", work / "run"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "rlhf_book.cli", "pipeline", "--config", config, "--out", str(out), "--no-progress"]
    cmd += ["--iterations", str(iterations)] if iterations else []
    env = {**os.environ, "RLHF_BOOK_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_WAIT_POLICY": "PASSIVE",
           **{k: common.THREAD_ENV[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}}
    marks, lines, stamped = {}, [], []
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=common.REPO, env=env) as proc:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append(line.rstrip())
            stamped.append(f"{t:9.1f}  {line.rstrip()}")
            if line[:5] in STAGES or line.rstrip() == "{":  # "{": the summary JSON, printed once PPO is done
                marks[line[:5].rstrip()] = t
        rc = proc.wait()
    total = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    (work / "pipeline.log").write_text("\n".join(stamped) + "\n")  # seconds since start, then the line
    if rc != 0:
        sys.stderr.write("\n".join(stamped[-40:]) + "\n")
    t1, t2, t3, t4 = (marks.get(k) for k in (*STAGES, "{"))
    stages = None
    if None not in (t1, t2, t3, t4):
        stages = {"startup_s": round(t1, 1), "base_lm_s": round(t2 - t1, 1), "reward_model_s": round(t3 - t2, 1),
                  "ppo_s": round(t4 - t3, 1), "exit_s": round(total - t4, 1)}
    shown = shlex.join(["python", *cmd[1:]])
    return {"config": config, "iterations": iterations, "command": shown, "exit_code": rc,
            "total_s": round(total, 1), "stages": stages, "summary": last_json(lines), "log": str(work / "pipeline.log")}


def last_json(lines: list[str]) -> dict | None:
    """The JSON summary the CLI prints last (a multi-line object), or None."""
    starts = [i for i, ln in enumerate(lines) if ln == "{"]
    if not starts:
        return None
    try:
        return json.loads("\n".join(lines[starts[-1]:]))
    except json.JSONDecodeError:
        return None


# ----------------------------------------------------------------------------- report
def fmt(x, spec=""):
    return "n/a" if x is None else format(x, spec)


def write_markdown(res: dict, path: Path) -> None:
    dev = res["device"]
    lines = [f"# GPU benchmark: rlhf_book PPO vs TRL PPO, and the full pipeline{' (SMOKE: CPU, tiny sizes)' if res['smoke'] else ''}", "",
             (f"Date: {res['date']}. Device: {dev.get('name') or 'CPU'} (torch {dev.get('torch')}, CUDA {dev.get('torch_cuda')}); "
              f"host: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']})."), "",
             f"Command: `{res['command']}`", ""]
    ppo = res.get("ppo")
    if ppo:
        m, p = ppo["model"], ppo["parameters"]
        lines += [
            "## Ours vs TRL PPO", "",
            (f"Random-init GPT-2, {m['n_layer']} layers, width {m['n_embd']}, {m['n_head']} heads, {m['n_positions']} positions, "
             f"vocab {m['vocab_size']}: {p['total_lm'] / 1e6:.1f}M parameters (policy, reference), classifier "
             f"{p['n_cls'] / 1e6:.1f}M + embeddings (reward model, critic). The tokenizer is the project's own "
             f"(trained on the corpus) with {ppo['tokenizer_size']} ids; the other {m['vocab_size'] - ppo['tokenizer_size']} "
             f"rows of the tied embedding / LM head are kept for the parameter count and FLOPs but masked "
             f"(logit ~-1e4, `mask_unused_vocab`) so every sampled id is decodable. {ppo['batch_size']} sequences x "
             f"{ppo['new_tokens']} new tokens per iteration, {ppo['ppo_epochs']} PPO epoch, {ppo['minibatches']} minibatch, "
             f"{ppo['precision']}; {ppo['warmup']} warm-up + {ppo['iters']} measured iterations; peak "
             f"{fmt(ppo['peak_tflops'])} TFLOP/s."), "",
            "| implementation | median s/iter | generation tokens/s | training tokens/s | model TFLOP/s | MFU (iteration) | MFU (update) | peak GPU MiB (alloc / reserved) | peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in ppo["implementations"].values():
            lines.append(f"| {r['label']} | {r['median_s_per_iter']:.3f} | {fmt(r['generation_tokens_per_s'])} | "
                         f"{fmt(r['training_tokens_per_s'])} | {fmt(r['model_tflop_per_s'])} | {fmt(r['mfu_iteration'])} | "
                         f"{fmt(r['mfu_update'])} | {fmt(r['peak_gpu_mib'])} / {fmt(r['peak_gpu_reserved_mib'])} | {r['peak_rss_mib']:.0f} |")
        if "ours_over_trl" in ppo:
            lines += ["", "Ours / TRL: " + ", ".join(f"{k} {fmt(v)}" for k, v in ppo["ours_over_trl"].items())
                      + " (s/iter: lower is better for ours; the others: higher)."]
        lines += ["", "Median phase seconds per iteration:", ""]
        lines += [f"- {r['label']}: " + ", ".join(f"{k} {v:.4f}" for k, v in (r["phase_s_median"] or {}).items())
                  for r in ppo["implementations"].values()]
        lines += ["", "Versions: " + "; ".join(f"{r['label']}: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
                                              for r in ppo["implementations"].values()), "",
                  "How the numbers are computed (sums over the measured iterations; s/iter is a median):", "",
                  ("- generation tokens/s = B x new tokens / generation seconds; training tokens/s = B x (prompt + "
                   "response columns) x epochs / update seconds (ours: `step` minus generation and the experience "
                   "step, `trainer.timings`; TRL: the iteration minus generation, scoring forwards and "
                   "`gc.collect()`, so its log-probs from the stored generation logits, GAE and statistics are in it);"),
                  (f"- model FLOPs per iteration = 2 N_lm (T-1) B (generation) + 2 N_lm T B (reference) + 2 N_cls T B "
                   f"(reward) + 6 (N_lm + N_cls) T B x epochs (update of policy and critic), N_lm = {p['n_lm']:,}, "
                   f"N_cls = {p['n_cls']:,}, T = prompt + response columns; the same for both sides. TRL also runs a "
                   "no-grad critic forward for V_old (2 N_cls T B) that ours takes from the first update forward; it is "
                   "executed work, not model FLOPs;"),
                  "- MFU = model FLOPs / (seconds x peak), for the iteration and for the update alone;",
                  ("- bf16: ours autocasts every forward (`PPOConfig.precision`, and the worker's reward forward); "
                   "TRL's `bf16=True` autocasts only its training forward, so the worker autocasts generation and the "
                   "reference / value / reward forwards too (`--bf16-scope all`; the row `trl_ppo_stock_bf16` is TRL "
                   "as shipped). TF32 on for both."), ""]
    pipe = res.get("pipeline")
    if pipe:
        st = pipe["stages"] or {}
        lines += ["## Full pipeline (base LM -> reward model -> PPO), fresh cache", "",
                  f"Command: `{pipe['command']}` (exit {pipe['exit_code']}).", "",
                  "| stage | seconds |", "|---|---|",
                  *[f"| {k[:-2].replace('_', ' ')} | {v} |" for k, v in st.items()],
                  f"| **total** | **{pipe['total_s']}** |", "",
                  ("base lm: train + cache the preset's base LM, load it twice (policy, reference); reward model: "
                   "preference data + Bradley-Terry training + normalisation; ppo: the PPO iterations, evaluations, "
                   "plot and held-out samples; startup: Python and library imports; exit: interpreter shutdown."), ""]
        if pipe.get("summary"):
            lines += ["Summary: " + ", ".join(f"{k} {v}" for k, v in pipe["summary"].items() if k != "out_dir"), ""]
    if res.get("problems"):
        lines += ["## Problems", "", *[f"- {p}" for p in res["problems"]], ""]
    path.write_text("\n".join(lines))


def check(res: dict, smoke: bool) -> list[str]:
    """Every part that ran produced its numbers (the --smoke contract)."""
    bad = []

    def need(name, x):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0):
            bad.append(f"{name}: {x!r}")

    ppo = res.get("ppo")
    if ppo:
        for n, r in ppo["implementations"].items():
            for k in ("median_s_per_iter", "generation_tokens_per_s", "training_tokens_per_s", "model_tflop_per_s"):
                need(f"{n}.{k}", r[k])
            if not smoke:
                need(f"{n}.peak_gpu_mib", r["peak_gpu_mib"])
            if r["max_sampled_id"] is None or r["max_sampled_id"] >= ppo["tokenizer_size"]:
                bad.append(f"{n}: sampled id {r['max_sampled_id']} outside the tokenizer's {ppo['tokenizer_size']}")
    pipe = res.get("pipeline")
    if pipe:
        if pipe["exit_code"] != 0 or not pipe["stages"] or not pipe["summary"]:
            bad.append(f"pipeline: exit {pipe['exit_code']}, stages {pipe['stages']}, summary {pipe['summary']} (see {pipe['log']})")
        else:
            for k, v in pipe["stages"].items():
                need(f"pipeline.{k}", v)
    return bad


# ----------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, output under benchmarks/.work/smoke")
    ap.add_argument("--parts", nargs="+", choices=["ppo", "pipeline"], default=["ppo", "pipeline"])
    ap.add_argument("--only", nargs="+", choices=list(IMPLS), default=None, help=f"implementations (default {DEFAULT_IMPLS})")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per iteration (default 64; smoke 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per sequence (default 64; smoke 8)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 2; smoke 1)")
    ap.add_argument("--iters", type=int, default=None, help="measured iterations (default 10; smoke 2)")
    ap.add_argument("--vocab-size", type=int, default=GPT2_SMALL["vocab_size"], help="GPU model's vocabulary (50257: 124M)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS)")
    ap.add_argument("--pipeline-config", default=None, help="default configs/ppo_gpu.toml (smoke: configs/ppo_tiny.toml)")
    ap.add_argument("--pipeline-iterations", type=int, default=None, help="PPO iterations (default: the config's; smoke 2)")
    ap.add_argument("--out", default=None, help="results JSON (default results/gpu_ppo_vs_trl.json; smoke .work/smoke/)")
    ap.add_argument("--merge", action="store_true", help="keep the parts not run now from an existing --out (split runs)")
    args = ap.parse_args()
    smoke = args.smoke
    args.device, args.precision = ("cpu", "fp32") if smoke else ("cuda", "bf16")
    for k, full, tiny in (("batch_size", 64, 4), ("new_tokens", 64, 8), ("warmup", 2, 1), ("iters", 10, 2)):
        if getattr(args, k) is None:
            setattr(args, k, tiny if smoke else full)
    args.only = args.only or DEFAULT_IMPLS
    config = args.pipeline_config or ("configs/ppo_tiny.toml" if smoke else "configs/ppo_gpu.toml")
    pipe_iters = args.pipeline_iterations or (2 if smoke else None)
    out = Path(args.out) if args.out else (common.WORK / "smoke" if smoke else common.RESULTS) / "gpu_ppo_vs_trl.json"
    scratch = common.WORK / ("smoke" if smoke else "gpu-runs")
    scratch.mkdir(parents=True, exist_ok=True)

    dev = device_info(sys.executable)
    if not smoke:
        if not dev["cuda"]:
            print("run_gpu.py: no CUDA GPU visible to this Python (torch.cuda.is_available() is False or torch is the CPU "
                  "build); run it on a GPU machine, or use --smoke for the CPU check.", file=sys.stderr)
            return 2
        if any(IMPLS[n][0] == "trl112" for n in args.only) and "ppo" in args.parts:
            trl_dev = device_info(common.python_for("trl112"))
            if not trl_dev["cuda"]:
                print(f"run_gpu.py: {common.VENV_TRL112.name} has no CUDA torch ({trl_dev}); recreate it with the CUDA "
                      "build (benchmarks/README.md, 'GPU benchmark').", file=sys.stderr)
                return 2
    load_start, t0 = common.loadavg(), time.perf_counter()
    res = {"smoke": smoke, "device": dev}
    problems = []
    if "ppo" in args.parts:
        print("part ppo: ours vs TRL", flush=True)
        try:
            res["ppo"] = run_ppo_part(args, scratch)
        except Exception as e:  # noqa: BLE001  (any failure: keep going, the pipeline's numbers are worth having)
            problems.append(f"ppo part failed: {e}")
    if "pipeline" in args.parts:
        print(f"part pipeline: {config} (fresh cache)", flush=True)
        res["pipeline"] = pipe = run_pipeline_part(config, pipe_iters, scratch / "pipeline")
        print(f"  total {pipe['total_s']} s, stages {pipe['stages']}, exit {pipe['exit_code']}", flush=True)
    res = {**common.run_header("gpu_ppo_vs_trl" + ("_smoke" if smoke else ""), load_start, t0), **res}
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        for part in ("ppo", "pipeline"):
            if part not in res and part in old:
                res[part] = old[part]
                res.setdefault("merged_from", []).append({"part": part, "date": old["date"], "command": old["command"]})
    res["problems"] = problems + check(res, smoke)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")
    if "ours_over_trl" in res.get("ppo", {}):
        print("ours / TRL:", res["ppo"]["ours_over_trl"])
    for p in res["problems"]:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if res["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
