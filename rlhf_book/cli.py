"""The command line: the whole pipeline (base LM -> reward model -> PPO) from one config file.

    rlhf-book pipeline --config configs/ppo_cpu.toml            # or: python -m rlhf_book.cli pipeline ...
    rlhf-book pipeline --config configs/ppo_cpu.toml --iterations 80   # continue the same run further
    rlhf-book base --preset cpu                                 # only build/cache the base LM
    rlhf-book reward --preset cpu                               # only build/cache the reward model

A config is TOML (or JSON) with two tables: ``[pipeline]`` (see :class:`PipelineConfig`)
and ``[ppo]`` (any :class:`rlhf_book.ppo.PPOConfig` field). The output directory receives
``run_config.json`` (the resolved config), ``metrics.jsonl`` (one line per iteration, written
as the run goes), ``history.json``, ``diagnostics.png``, ``samples.jsonl`` (held-out
responses after training, with proxy and gold scores), ``policy/`` (the trained policy and
its tokenizer, ``save_pretrained`` format) and ``ppo_state.pt`` (the checkpoint). Running the
same command again resumes from the checkpoint; a finished run is not repeated; a run
whose config was changed since is refused, naming the changed fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .trainer import check_config, config_changes

__all__ = ["PipelineConfig", "PIPELINE_DEFAULTS", "load_config", "run_pipeline", "main", "RUN_CONFIG_NAME"]

RUN_CONFIG_NAME = "run_config.json"  # not HF's "config.json": runs/<name>/policy/ holds that one
# [pipeline] keys that may change when a run is continued
RESUMABLE_PIPELINE_KEYS = frozenset({"iterations", "out_dir", "n_samples", "threads", "device"})


@dataclass
class PipelineConfig:
    """The ``[pipeline]`` table: which world to build and how long to train."""

    preset: str = "cpu"  # base LM preset (tiny / cpu / gpu), a saved model directory, or (reward = "gold") a hub name
    reward: str = "model"  # "model": the learned reward model of the preset; "gold": optimise the gold reward itself
    critic: str = "head"  # "head" (value head on the policy), "reward_model" (ValueModel from the RM) or "base"
    iterations: int = 60  # PPO iterations (>= 1; a larger number continues a finished run)
    out_dir: str | None = None  # default: runs/<config file name>
    n_eval: int = 32  # held-out prompts (rlhf_book.corpus.prompt_split takes n_eval // 6 per domain, at least 1)
    split_seed: int = 0  # seed of the prompt split
    n_samples: int = 8  # held-out samples written to samples.jsonl
    device: str | None = None  # default: rlhf_book.get_device()
    threads: int | None = None  # torch intra-op threads (default: rlhf_book.configure_threads())

    def __post_init__(self):
        check_config(self, positive=("iterations", "n_eval"), positive_or_none=("threads",), nonnegative=("n_samples",))
        if self.reward not in ("model", "gold"):
            raise ValueError(f"[pipeline] reward must be 'model' or 'gold', got {self.reward!r}")
        if self.critic not in ("head", "reward_model", "base"):
            raise ValueError(f"[pipeline] critic must be 'head', 'reward_model' or 'base', got {self.critic!r}")
        if self.critic == "reward_model" and self.reward != "model":
            raise ValueError("[pipeline] critic = 'reward_model' needs reward = 'model'")
        from .base_model import PRESETS, resolve_model_name

        resolve_model_name(self.preset)  # a typo of a preset fails here, before anything is built
        if self.reward == "model" and self.preset not in PRESETS:
            raise ValueError(f"[pipeline] reward = 'model' needs one of the presets {', '.join(PRESETS)} (its reward "
                             f"model is built from the preset's data), got preset = {self.preset!r}")
        if self.device is not None:
            from .runtime import check_device

            try:
                check_device(self.device, available=False)  # availability is checked when the run starts
            except ValueError as e:
                raise ValueError(f"[pipeline] {e}") from None


PIPELINE_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}


def _read_table_file(path: Path) -> dict:
    """Parse a TOML or JSON file; ValueError naming the file on a syntax error."""
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError(f"{path}: reading TOML needs Python >= 3.11 (or `pip install tomli`); use a .json config") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | Path) -> dict:
    """Read a TOML or JSON config into ``{"pipeline": {...}, "ppo": {...}}``, defaults filled in, every value checked."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    raw = _read_table_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected tables [pipeline] and [ppo], got a {type(raw).__name__}")
    unknown = sorted(set(raw) - {"pipeline", "ppo"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; expected [pipeline] and [ppo]")
    for table in ("pipeline", "ppo"):
        if not isinstance(raw.get(table, {}), dict):
            raise ValueError(f"{path}: [{table}] must be a table of key = value lines, got {raw[table]!r}")
    pipe = dict(raw.get("pipeline", {}))
    bad = sorted(set(pipe) - set(PIPELINE_DEFAULTS))
    if bad:
        raise ValueError(f"{path}: unknown [pipeline] key(s) {bad}{_did_you_mean(bad, PIPELINE_DEFAULTS)}")
    if pipe.get("out_dir") is None:
        pipe["out_dir"] = str(Path("runs") / path.stem)
    try:
        pipe = asdict(PipelineConfig(**pipe))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    from .ppo import PPOConfig

    ppo = dict(raw.get("ppo", {}))
    try:
        PPOConfig.from_dict(ppo)
    except ValueError as e:
        raise ValueError(f"{path}: [ppo] {e}") from None
    return {"pipeline": pipe, "ppo": ppo}


def _did_you_mean(bad: list[str], known) -> str:
    import difflib

    hints = [f"{b!r} -> {m[0]!r}" for b in bad if (m := difflib.get_close_matches(b, list(known), n=1))]
    return f"; did you mean {', '.join(hints)}?" if hints else f"; known: {sorted(known)}"


def _check_resume(out: Path, record: dict) -> None:
    """Refuse to continue a run in ``out`` whose recorded config differs (beyond what may change on resume)."""
    from .ppo import CHECKPOINT_NAME

    saved_path = out / RUN_CONFIG_NAME
    if not (out / CHECKPOINT_NAME).exists() or not saved_path.exists():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{saved_path}: unreadable ({e}); it records the run's config, so the run cannot be "
                         f"checked and continued: start a new run in another out_dir (--out)") from None
    changed = [f"[pipeline] {c}" for c in config_changes(saved.get("pipeline", {}), record["pipeline"],
                                                         RESUMABLE_PIPELINE_KEYS)]
    changed += [f"[ppo] {c}" for c in config_changes(saved.get("ppo", {}), record["ppo"])]
    if changed:
        raise ValueError(
            f"{out} holds a run made with another config ({'; '.join(changed)}). Put those values back to continue "
            f"it, or give the changed config another out_dir (--out) to start a new run."
        )


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
    pipe = asdict(PipelineConfig(**pipe))  # checks an --iterations override too
    out = Path(pipe["out_dir"])
    ppo_cfg = PPOConfig.from_dict({**config["ppo"], "progress": progress})
    record = {"pipeline": pipe, "ppo": {k: v for k, v in asdict(ppo_cfg).items() if k != "progress"}}
    _check_resume(out, record)
    device = get_device(pipe["device"])  # an unavailable device fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    threads = configure_threads(pipe["threads"])
    (out / RUN_CONFIG_NAME).write_text(json.dumps({**record, "threads_used": threads}, indent=1))
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
    trainer.export(out / "policy")
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
        "policy": str(out / "policy"),
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
