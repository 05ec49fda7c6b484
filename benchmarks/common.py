"""Shared setup of the CPU benchmarks: one definition of the task, used by every worker.

The orchestrators (system Python, with ``rlhf_book`` installed) build the artefacts once:
the tokenizer (``rlhf_book.train_tokenizer`` on the corpus), the 64 prompts, and the
random-init weights of the policy, the critic and the reward model. Every worker, in
whatever venv, loads those same files, so ours and TRL start from identical weights.

This module imports neither torch nor rlhf_book at top level: the TRL venvs do not have
rlhf_book, and workers must set thread env vars before torch loads.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work"  # gitignored: artefacts and scratch output dirs
RESULTS = HERE / "results"
VENV_TRL112 = HERE / ".venv-trl112"
VENV_TRL116 = HERE / ".venv-trl116"

# The task (the speed issue's CPU benchmark). Change here, not in the workers.
SETUP = {
    "n_layer": 4,
    "n_embd": 256,
    "n_head": 4,
    "n_positions": 256,  # room for prompt + 128 new tokens in the scaling sweep
    "vocab_size": 1024,
    "n_prompts": 64,
    "batch_size": 16,  # sequences per iteration
    "response_length": 24,  # new tokens
    "ppo_epochs": 1,
    "minibatches": 1,
    "dtype": "float32",
    "threads": 2,
    "temperature": 1.0,
    "kl_coef": 0.05,
    "lr": 1e-5,
    "seed": 0,
    "tokenizer_texts": 20_000,
}

THREAD_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": str(SETUP["threads"]),
    "MKL_NUM_THREADS": str(SETUP["threads"]),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "WANDB_DISABLED": "true",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "PYTHONHASHSEED": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "PYTHONWARNINGS": "ignore",
}


def worker_env(extra: dict | None = None) -> dict:
    """The environment every worker subprocess gets (identical for ours and TRL)."""
    env = dict(os.environ)
    for k in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(k, None)
    env.update(THREAD_ENV)
    env.update(extra or {})
    return env


def artifacts_dir(n_layer: int, n_embd: int, n_head: int) -> Path:
    return WORK / f"setup-L{n_layer}-W{n_embd}-H{n_head}"


def build_artifacts(n_layer: int = SETUP["n_layer"], n_embd: int = SETUP["n_embd"], n_head: int = SETUP["n_head"]) -> Path:
    """Tokenizer, prompts, and random-init policy / critic / reward weights; idempotent. Main Python only."""
    out = artifacts_dir(n_layer, n_embd, n_head)
    if (out / "setup.json").exists():
        return out
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    import rlhf_book  # noqa: F401  (before torch: sets OMP_WAIT_POLICY)
    from rlhf_book.corpus import generate_examples, sample_prompts
    from rlhf_book.tokenizer import format_prompt, train_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok_dir = WORK / "tokenizer-v1024"
    if not (tok_dir / "tokenizer.json").exists():
        examples = generate_examples(SETUP["tokenizer_texts"], seed=SETUP["seed"])
        tok = train_tokenizer((format_prompt(e.prompt) + e.response for e in examples), vocab_size=SETUP["vocab_size"])
        tok.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.padding_side = "left"
    tok.save_pretrained(tmp / "tokenizer")
    prompts = [p["prompt"] for p in sample_prompts(SETUP["n_prompts"], seed=SETUP["seed"])]
    (tmp / "prompts.json").write_text(json.dumps(prompts, indent=0))

    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=SETUP["n_positions"], n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_labels=1,
    )
    torch.manual_seed(SETUP["seed"])
    GPT2LMHeadModel(cfg).save_pretrained(tmp / "policy")
    torch.manual_seed(SETUP["seed"] + 1)
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp / "reward")
    torch.manual_seed(SETUP["seed"] + 2)
    GPT2ForSequenceClassification(cfg).save_pretrained(tmp / "value")
    meta = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": SETUP["n_positions"],
            "vocab_size": len(tok), "n_prompts": len(prompts), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    (tmp / "setup.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


# The DPO benchmark (run_cpu_dpo_vs_trl.py): the book's CPU base model and preference data, not the PPO setup above.
DPO_SETUP = {
    "base_model": "cpu",  # rlhf_book.load_base_model("cpu"): 2-layer GPT-2, width 128, vocab 1024
    "data": "cpu",  # rlhf_book.preferences.load_preference_data("cpu")["train"]
    "n_pairs": 512,  # the first 512 train pairs whose two replies both end with EOS (TRL always appends one)
    "batch_size": 32,  # pairs per optimizer step (one forward of 64 rows: 32 chosen, then 32 rejected)
    "beta": 0.1,
    "loss_type": "sigmoid",
    "lr": 1e-4,  # our DPOConfig default; TRL's is 1e-6 (speed does not depend on it)
    "adam_eps": 1e-5,  # our default; TRL's adam_epsilon is set to it
    "max_grad_norm": 1.0,  # both defaults
    "ref_batch_size": 128,  # pairs per reference forward when precomputing (ours: ref_batch_size default;
                            # TRL: precompute_ref_batch_size, set to it)
    "dtype": "float32",
    "threads": 2,
    "seed": 0,
    "order_steps": 256,  # optimizer steps whose batches are fixed in batch_order.json (16 epochs of 512 pairs)
}


def dpo_artifacts_dir(n_pairs: int = DPO_SETUP["n_pairs"]) -> Path:
    return WORK / f"dpo-setup-{DPO_SETUP['base_model']}-{n_pairs}pairs-bs{DPO_SETUP['batch_size']}"


def build_dpo_artifacts(n_pairs: int = DPO_SETUP["n_pairs"]) -> Path:
    """The DPO benchmark's shared files; idempotent. Main Python only (imports rlhf_book).

    ``model/``: a copy of the cached base model directory (weights + tokenizer, save_pretrained
    format) that both workers load; ``pairs.json``: our records; ``trl_records.json``: the same
    pairs through ``rlhf_book.preferences.to_trl_records`` (prompt = ``format_prompt(prompt)``);
    ``batch_order.json``: the rows of every optimizer step as our ``DPOTrainer.batch_rows`` draws
    them, so TRL's sampler can be given the very same batches.
    """
    D = DPO_SETUP
    out = dpo_artifacts_dir(n_pairs)
    if (out / "setup.json").exists():
        return out
    import shutil

    import rlhf_book  # before torch: sets OMP_WAIT_POLICY
    from rlhf_book.base_model import base_model_path
    from rlhf_book.dpo import DPOConfig, DPOTrainer
    from rlhf_book.preferences import load_preference_data, preference_data_path, to_trl_records

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    src = Path(base_model_path(D["base_model"]))
    if not (src / "config.json").exists():  # not built yet: load_base_model builds and caches it
        rlhf_book.load_base_model(D["base_model"], device="cpu")
    shutil.copytree(src, tmp / "model")
    train = load_preference_data(D["data"])["train"]
    both = [r for r in train if r.get("chosen_terminated", True) and r.get("rejected_terminated", True)]
    if len(both) < n_pairs:
        raise ValueError(f"only {len(both)} train pairs with two terminated replies, {n_pairs} asked for")
    pairs = both[:n_pairs]
    skipped = next(i for i, r in enumerate(train) if r is pairs[-1]) + 1 - n_pairs
    (tmp / "pairs.json").write_text(json.dumps(pairs))
    (tmp / "trl_records.json").write_text(json.dumps(to_trl_records(pairs)))
    policy, tok = rlhf_book.load_base_model(str(tmp / "model"), device="cpu")
    ref, _ = rlhf_book.load_base_model(str(tmp / "model"), device="cpu")
    cfg = DPOConfig(batch_size=D["batch_size"], seed=D["seed"], progress=False)
    trainer = DPOTrainer(policy, ref, tok, cfg)
    order = [trainer.batch_rows(s, n_pairs) for s in range(D["order_steps"])]
    (tmp / "batch_order.json").write_text(json.dumps(order))
    meta = {"base_model_source": str(src), "preference_data": str(preference_data_path(D["data"])),
            "n_pairs": n_pairs, "unterminated_pairs_skipped": skipped, "train_pairs": len(train),
            "n_params": sum(p.numel() for p in policy.parameters()), "vocab_size": len(tok),
            "n_layer": policy.config.n_layer, "n_embd": policy.config.n_embd, "n_head": policy.config.n_head,
            "n_positions": policy.config.n_positions, "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "steps_per_epoch": trainer.steps_per_epoch(n_pairs),
            "order_steps": D["order_steps"]}
    (tmp / "setup.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_prompts(art: Path) -> list[str]:
    return json.loads((Path(art) / "prompts.json").read_text())


def worker_args(ap) -> None:
    """The flags every worker takes: where the artefacts are, where to write, how many iterations."""
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)


def load_tokenizer_and_prompts(art: Path):
    """The shared tokenizer (left padding) and the 64 prompts; imports transformers, so call after the env is set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(art) / "tokenizer")
    tok.padding_side = "left"
    return tok, load_prompts(art)


def make_clock(device: str):
    """A perf_counter that first waits for the device's queued kernels (CUDA runs asynchronously)."""
    import torch

    def clock() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    return clock


def gpu_memory(device: str) -> dict:
    """Peak GPU memory of this process in MiB (allocated by tensors, and reserved by the caching allocator)."""
    import torch

    if not device.startswith("cuda"):
        return {"peak_gpu_mib": None, "peak_gpu_reserved_mib": None, "device_name": "cpu"}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
            "device_name": torch.cuda.get_device_name()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "mem_gib": mem, "platform": platform.platform(),
            "python": sys.version.split()[0]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def summarize(times: list[float], warmup: int, tokens_per_iter: list[int] | None = None,
              cpu_times: list[float] | None = None) -> dict:
    """Median / min / max seconds per iteration after ``warmup`` iterations, and generated tokens/s.

    ``cpu_times``: process CPU seconds (all threads, time.process_time) per iteration: less
    sensitive than wall time to other jobs on a shared machine.
    """
    meas = times[warmup:]
    if not meas:
        raise ValueError(f"no measured iterations: {len(times)} timed, warmup={warmup}")
    out = {"iter_seconds": [round(t, 4) for t in times], "warmup": warmup, "measured": len(meas),
           "median_s_per_iter": round(median(meas), 4), "min_s_per_iter": round(min(meas), 4),
           "max_s_per_iter": round(max(meas), 4)}
    if cpu_times:
        out["cpu_seconds"] = [round(t, 4) for t in cpu_times]
        out["median_cpu_s_per_iter"] = round(median(cpu_times[warmup:]), 4)
    if tokens_per_iter:
        tok = tokens_per_iter[warmup:]
        out["generated_tokens_per_iter"] = round(sum(tok) / len(tok), 1)
        out["generated_tokens_per_s"] = round(sum(tok) / sum(meas), 1)
    return out


def write_json(path: Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def checkout(rev: str) -> Path:
    """``git archive`` of the library and the workers at ``rev`` into benchmarks/.work/rev-<rev> (once)."""
    tree = WORK / f"rev-{rev}"
    if not (tree / "rlhf_book").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev, "rlhf_book", "benchmarks"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def launch(name: str, cmd: list[str], out: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run one worker; its JSON with ``wall_s``, ``command`` and the busy processes after it (RuntimeError on failure)."""
    import shlex

    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env or worker_env(), cwd=cwd or REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not Path(out).exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}")
    res = json.loads(Path(out).read_text())
    res["wall_s"] = round(time.perf_counter() - t, 1)
    res["command"] = shlex.join(cmd)
    res["other_busy_processes_after"] = load_snapshot().get("busy_processes")  # jobs that may have shared the CPUs
    return res


def pooled(runs: list[dict]) -> dict:
    """What every orchestrator reports of one implementation: the measured iterations of all rounds pooled."""
    meas = [t for r in runs for t in r["iter_seconds"][r["warmup"]:]]
    cpu = [t for r in runs for t in r.get("cpu_seconds", [])[r["warmup"]:]]
    first = runs[0]
    return {
        "label": first.get("label"), "versions": first.get("versions"), "config": first.get("config"),
        "threads": first.get("threads"), "rounds": len(runs), "measured_iterations": len(meas),
        "median_s_per_iter": round(median(meas), 4), "round_medians_s": [r["median_s_per_iter"] for r in runs],
        "min_s_per_iter": round(min(meas), 4), "max_s_per_iter": round(max(meas), 4),
        "median_cpu_s_per_iter": round(median(cpu), 4) if cpu else None,
        "round_median_cpu_s": [r.get("median_cpu_s_per_iter") for r in runs],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "setup_s": first.get("setup_s"),
        "loadavg": [[r["loadavg_start"], r["loadavg_end"]] for r in runs],
        "other_busy_processes": [r.get("other_busy_processes_after") for r in runs], "command": first["command"],
    }


def ratio(ours: dict, trl: dict, ours_runs: list[dict], trl_runs: list[dict]) -> dict:
    """Ours / TRL of two pooled implementations: wall and CPU s/iter (overall and per round) and peak RSS."""
    out = {"wall": round(ours["median_s_per_iter"] / trl["median_s_per_iter"], 3),
           "wall_per_round": [round(a["median_s_per_iter"] / b["median_s_per_iter"], 3)
                              for a, b in zip(ours_runs, trl_runs)],
           "rss": round(ours["peak_rss_mib"] / trl["peak_rss_mib"], 3)}
    if ours.get("median_cpu_s_per_iter") and trl.get("median_cpu_s_per_iter"):
        out["cpu"] = round(ours["median_cpu_s_per_iter"] / trl["median_cpu_s_per_iter"], 3)
        out["cpu_per_round"] = [round(a["median_cpu_s_per_iter"] / b["median_cpu_s_per_iter"], 3)
                                for a, b in zip(ours_runs, trl_runs)]
    return out


def worker_footer(setup_s: float, load_start: list[float]) -> dict:
    """The fields every worker's result ends with: setup time, peak RSS, load at start and end."""
    return {
        "setup_s": round(setup_s, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }


def run_header(benchmark: str, load_start: list[float], t0: float) -> dict:
    """The fields every orchestrator's result starts with: name, date, machine, load, wall time, command."""
    import shlex

    return {
        "benchmark": benchmark,
        "date": now(),
        "machine": machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def python_for(kind: str) -> str:
    """The interpreter of a worker: "main" (this one), "trl112" or "trl116" (their venvs, created on first use)."""
    if kind == "main":
        return sys.executable
    venv = VENV_TRL112 if kind == "trl112" else VENV_TRL116
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"{venv.name} missing: running setup_venvs.sh (torch==2.13.0 first, then pinned trl)", flush=True)
        subprocess.run(["bash", str(HERE / "setup_venvs.sh")], check=True, env={**os.environ, "PYTHON": sys.executable})
    return str(py)


def load_snapshot() -> dict:
    """Load average, ``uptime``, the busiest other processes and whether a chapter sweep runs: how shared the machine is."""
    snap = {"loadavg": loadavg(), "time": now()}
    try:
        snap["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        snap["uptime"] = None
    try:
        ps = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True,
                            timeout=10, check=False).stdout.splitlines()
        mine = {str(os.getpid())}
        snap["top_processes"] = [line.strip()[:160] for line in ps[1:8]
                                 if line.split() and line.split()[0] not in mine][:5]
        snap["busy_processes"] = [" ".join(line.split()[3:])[:100] for line in ps[1:]
                                  if line.split() and line.split()[0] not in mine and float(line.split()[1]) >= 20]
        snap["sweep_running"] = any("tools/sweep_ch" in line for line in ps[1:])
    except (OSError, subprocess.SubprocessError, ValueError):
        snap["top_processes"], snap["busy_processes"], snap["sweep_running"] = None, None, None
    return snap
