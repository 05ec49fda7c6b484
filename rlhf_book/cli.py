"""The command line: the whole pipeline (base LM -> reward model -> PPO) from one config file.

    rlhf-book pipeline --config configs/ppo_cpu.toml            # or: python -m rlhf_book.cli pipeline ...
    rlhf-book pipeline --config configs/ppo_cpu.toml --iterations 80   # continue the same run further
    rlhf-book base --preset cpu                                 # only build/cache the base LM
    rlhf-book reward --preset cpu                               # only build/cache the reward model

A config is TOML (or JSON) with two tables: ``[pipeline]`` (see :data:`PIPELINE_DEFAULTS`)
and ``[ppo]`` (any :class:`rlhf_book.ppo.PPOConfig` field). The output directory receives
``config.json`` (the resolved config), ``history.json``, ``diagnostics.png``,
``samples.jsonl`` (held-out responses after training, with proxy and gold scores) and
``ppo_state.pt`` (the checkpoint). Running the same command again resumes from the
checkpoint; a finished run is not repeated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["PIPELINE_DEFAULTS", "load_config", "run_pipeline", "main"]

PIPELINE_DEFAULTS = {
    "preset": "cpu",  # base LM preset (tiny / cpu / gpu) or a saved model directory
    "reward": "model",  # "model": the learned reward model of the preset; "gold": optimise the gold reward itself
    "critic": "head",  # "head" (value head on the policy), "reward_model" (ValueModel from the RM) or "base"
    "iterations": 60,  # PPO iterations
    "out_dir": None,  # default: runs/<config file name>
    "n_eval": 32,  # held-out prompts (rlhf_book.corpus.prompt_split)
    "split_seed": 0,  # seed of the prompt split
    "n_samples": 8,  # held-out samples written to samples.jsonl
    "device": None,  # default: rlhf_book.get_device()
    "threads": None,  # torch intra-op threads (default: rlhf_book.configure_threads())
}


def load_config(path: str | Path) -> dict:
    """Read a TOML or JSON config into ``{"pipeline": {...}, "ppo": {...}}``, defaults filled in, keys checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ValueError(
                    f"{path}: reading TOML needs Python >= 3.11 (or `pip install tomli`); use a .json config"
                ) from None
        raw = tomllib.loads(path.read_text())
    unknown = sorted(set(raw) - {"pipeline", "ppo"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; expected [pipeline] and [ppo]")
    pipe = dict(raw.get("pipeline", {}))
    bad = sorted(set(pipe) - set(PIPELINE_DEFAULTS))
    if bad:
        raise ValueError(f"{path}: unknown [pipeline] key(s) {bad}; known: {sorted(PIPELINE_DEFAULTS)}")
    pipe = {**PIPELINE_DEFAULTS, **pipe}
    if pipe["reward"] not in ("model", "gold"):
        raise ValueError(f"{path}: [pipeline] reward must be 'model' or 'gold', got {pipe['reward']!r}")
    if pipe["critic"] not in ("head", "reward_model", "base"):
        raise ValueError(f"{path}: [pipeline] critic must be 'head', 'reward_model' or 'base', got {pipe['critic']!r}")
    if pipe["critic"] == "reward_model" and pipe["reward"] != "model":
        raise ValueError(f"{path}: critic = 'reward_model' needs reward = 'model'")
    if pipe["out_dir"] is None:
        pipe["out_dir"] = str(Path("runs") / path.stem)
    from .ppo import PPOConfig

    try:
        PPOConfig.from_dict(dict(raw.get("ppo", {})))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: [ppo] {e}") from None
    return {"pipeline": pipe, "ppo": dict(raw.get("ppo", {}))}


def run_pipeline(config: dict, iterations: int | None = None, progress: bool = True) -> dict:
    """Base LM -> reward model -> PPO as ``config`` (from :func:`load_config`) says; returns a summary dict."""
    from .base_model import load_base_model
    from .corpus import prompt_split
    from .gold import gold_reward_fn
    from .ppo import CHECKPOINT_NAME, PPOConfig, PPOTrainer, build_critic, save_history
    from .runtime import configure_threads, get_device, set_seed

    pipe = dict(config["pipeline"])
    if iterations is not None:
        pipe["iterations"] = iterations
    out = Path(pipe["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    configure_threads(pipe["threads"])
    device = get_device(pipe["device"])
    ppo_cfg = PPOConfig.from_dict({**config["ppo"], "progress": progress})
    (out / "config.json").write_text(json.dumps({"pipeline": pipe, "ppo": config["ppo"]}, indent=1))
    set_seed(ppo_cfg.seed)

    print(f"[1/3] base LM ({pipe['preset']})", flush=True)
    policy, tok = load_base_model(pipe["preset"], device=device, progress=progress)
    ref, _ = load_base_model(pipe["preset"], device=device, progress=False)
    rm = None
    if pipe["reward"] == "model":
        from .reward_model import load_reward_model, reward_fn_from_model

        print(f"[2/3] reward model ({pipe['preset']})", flush=True)
        rm, rm_tok = load_reward_model(pipe["preset"], device=device, progress=progress)
        reward_fn = reward_fn_from_model(rm, rm_tok)
    else:
        print("[2/3] reward: the gold reward (no reward model)", flush=True)
        reward_fn = gold_reward_fn
    critic = build_critic(pipe["critic"], policy=policy, reward_model=rm)
    train, eval_set = prompt_split(pipe["split_seed"], pipe["n_eval"])

    resumed = (out / CHECKPOINT_NAME).exists()
    print(f"[3/3] PPO, {pipe['iterations']} iterations -> {out}" + (" (resuming)" if resumed else ""), flush=True)
    trainer = PPOTrainer(policy, ref, tok, reward_fn, ppo_cfg, critic=critic, gold_fn=gold_reward_fn)
    history = trainer.train(train, pipe["iterations"], checkpoint_dir=out, eval_prompts=eval_set)
    save_history(history, out / "history.json")

    import matplotlib.pyplot as plt

    from .plotting import plot_run

    fig = plot_run(history, title=f"PPO on {pipe['preset']} ({pipe['reward']} reward)")
    fig.savefig(out / "diagnostics.png", dpi=100)
    plt.close(fig)
    final = trainer.evaluate(eval_set, n_samples=pipe["n_samples"])
    with (out / "samples.jsonl").open("w") as f:
        for s in final.pop("samples"):
            f.write(json.dumps(s) + "\n")
    first = next((h for h in history if "eval_gold_reward" in h), {})
    summary = {
        "iterations": trainer.iteration,
        "eval_gold_reward_start": first.get("eval_gold_reward"),
        "eval_gold_reward_end": final.get("eval_gold_reward"),
        "eval_proxy_reward_start": first.get("eval_proxy_reward"),
        "eval_proxy_reward_end": final.get("eval_proxy_reward"),
        "eval_kl_end": final.get("eval_kl"),
        "out_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _build_base(args) -> None:
    from .base_model import load_base_model

    load_base_model(args.preset, device=args.device, progress=True)
    print(f"base LM {args.preset!r} is built and cached")


def _build_reward(args) -> None:
    from .reward_model import load_reward_model

    load_reward_model(args.preset, device=args.device, progress=True)
    print(f"reward model for {args.preset!r} is built and cached")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-book`` / ``python -m rlhf_book.cli``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="rlhf-book", description="RLHF on a GPT trained from scratch: base LM -> reward model -> PPO."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="base LM -> reward model -> PPO, as a config file says (resumable)")
    p.add_argument("--config", required=True, help="TOML or JSON file with [pipeline] and [ppo] tables")
    p.add_argument("--iterations", type=int, default=None,
                   help="override [pipeline] iterations (a larger number continues a run)")
    p.add_argument("--out", default=None, help="override [pipeline] out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, helptext in (("base", "build and cache the base LM"), ("reward", "build and cache the reward model")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--preset", default="cpu", help="tiny, cpu or gpu")
        q.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # files only, no windows
    try:
        if args.command == "pipeline":
            config = load_config(args.config)
            if args.out is not None:
                config["pipeline"]["out_dir"] = args.out
            summary = run_pipeline(config, iterations=args.iterations, progress=not args.no_progress)
            print(json.dumps(summary, indent=1))
        elif args.command == "base":
            _build_base(args)
        else:
            _build_reward(args)
    except ValueError as e:
        print(f"rlhf-book: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
