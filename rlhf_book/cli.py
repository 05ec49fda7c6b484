"""The command line: the whole pipeline (base LM -> reward model -> RL) from one config file.

    rlhf-book pipeline --config configs/ppo_cpu.toml            # or: python -m rlhf_book.cli pipeline ...
    rlhf-book pipeline --config configs/ppo_cpu.toml --iterations 80   # continue the same run further
    rlhf-book pipeline --config configs/ppo_cpu.toml --ppo.kl_coef 0.1 --out runs/beta0.1   # override any field
    rlhf-book options ppo                                       # every field: type, default, valid values, help
    rlhf-book base --preset cpu                                 # only build/cache the base LM
    rlhf-book reward --preset cpu                               # only build/cache the reward model
    accelerate launch --multi_gpu --num_processes 8 -m rlhf_book.cli pipeline --config configs/ppo_gpu.toml
    torchrun --nproc_per_node 8 -m rlhf_book.cli pipeline --config configs/ppo_gpu.toml   # N processes, DDP

Under a launcher each process trains on its share of every global batch (README, "Scaling out");
only the main process prints and writes the outputs.

A config is TOML (or JSON) with two tables: ``[pipeline]`` (see :class:`PipelineConfig`)
and one named after ``[pipeline] algorithm`` (``[ppo]``: any :class:`rlhf_book.ppo.PPOConfig`
field; ``[a2c]``: any :class:`rlhf_book.a2c.A2CConfig` field). ``--TABLE.FIELD VALUE`` on the
command line overrides a field of either table (VALUE is read as a TOML value: ``0.1``,
``true``, ``"head"``; ``none`` is None). ``[pipeline] prompts`` names the reader's own prompt
file (JSONL records with a ``prompt`` field, or a text file with one prompt per line); by
default the book's prompts are used. The output directory receives ``run_config.json``
(the resolved config), ``metrics.jsonl`` (one line per iteration, written as the run goes),
``history.json``, ``diagnostics.png``, ``samples.jsonl`` (held-out responses after training,
with their scores), ``policy/`` (the trained policy and its tokenizer, ``save_pretrained``
format) and the checkpoint. Running the same command again resumes from the checkpoint; a
finished run is not repeated; a run whose config was changed since is refused, naming the
changed fields.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .config import Config, config_changes, describe, option
from .trainer import RESUMABLE_FIELDS

__all__ = ["PipelineConfig", "PIPELINE_DEFAULTS", "ALGORITHMS", "load_config", "run_pipeline", "main",
           "RUN_CONFIG_NAME", "read_prompt_file"]

RUN_CONFIG_NAME = "run_config.json"  # not HF's "config.json": runs/<name>/policy/ holds that one
# [pipeline] keys that may change when a run is continued
RESUMABLE_PIPELINE_KEYS = frozenset({"iterations", "out_dir", "n_samples", "threads", "device"})
ALGORITHMS = ("ppo", "a2c")  # each names its config table and its trainer (see _algorithm)


def _algorithm(name: str):
    """(config class, trainer class) of the algorithm ``name``."""
    if name == "ppo":
        from .ppo import PPOConfig, PPOTrainer

        return PPOConfig, PPOTrainer
    if name == "a2c":
        from .a2c import A2CConfig, A2CTrainer

        return A2CConfig, A2CTrainer
    raise ValueError(f"unknown algorithm {name!r}; choose one of {list(ALGORITHMS)}")


@dataclass
class PipelineConfig(Config):
    """The ``[pipeline]`` table: which world to build, which algorithm, how long to train."""

    preset: str = option("cpu", "base LM: a preset (tiny / cpu / gpu), a saved model directory, or (reward = 'gold') "
                                "a hub name")
    algorithm: str = option("ppo", "the RL algorithm; its fields are the table of the same name", choices=ALGORITHMS)
    reward: str = option("model", "'model': the learned reward model of the preset; 'gold': optimise the gold reward "
                                  "itself", choices=("model", "gold"))
    critic: str = option("head", "'head' (value head on the policy), 'separate' (a copy of the policy's trunk) or "
                                 "'reward_model' (a separate critic initialised from the RM)",
                         choices=("head", "separate", "reward_model"))
    iterations: int = option(60, "RL iterations (a larger number continues a finished run)", ">= 1")
    out_dir: str | None = option(None, "output directory (default: runs/<config file name>)")
    prompts: str | None = option(None, "the reader's prompt file (JSONL with 'prompt', or one prompt per line); "
                                       "None: the book's prompts")
    n_eval: int = option(32, "held-out prompts (the book's split takes n_eval // 6 per domain, at least 1)", ">= 1")
    split_seed: int = option(0, "seed of the train / held-out prompt split")
    gold: bool = option(True, "log the book's gold reward beside the proxy (it knows only the book's world)")
    n_samples: int = option(8, "held-out samples written to samples.jsonl", ">= 0")
    device: str | None = option(None, "default: rlhf_book.get_device()")
    threads: int | None = option(None, "torch intra-op threads (default: rlhf_book.configure_threads())", ">= 1")

    def check(self) -> None:
        if self.critic == "reward_model" and self.reward != "model":
            raise ValueError("[pipeline] critic = 'reward_model' needs reward = 'model'")
        from .base_model import PRESETS, resolve_model_name

        resolve_model_name(self.preset)  # a typo of a preset fails here, before anything is built
        if self.reward == "model" and self.preset not in PRESETS:
            raise ValueError(f"[pipeline] reward = 'model' needs one of the presets {', '.join(PRESETS)} (its reward "
                             f"model is built from the preset's data), got preset = {self.preset!r}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ValueError(f"[pipeline] prompts: file {self.prompts} does not exist")
        if self.device is not None:
            from .runtime import check_device

            try:
                check_device(self.device, available=False)  # availability is checked when the run starts
            except ValueError as e:
                raise ValueError(f"[pipeline] {e}") from None


PIPELINE_DEFAULTS = {f.name: f.default for f in fields(PipelineConfig)}


MAX_PROMPT_CHARS = 100_000  # a longer line is refused before it is tokenised (a 10 MB line took minutes per batch)


def read_text_file(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file (a BOM is dropped); ValueError naming the file and the line of a byte that is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: the {what} is not valid UTF-8 (byte 0x{data[start]:02x}: {e.reason}); "
                         f"save it as UTF-8") from None


def prompt_file_lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, prompt) of every prompt in a JSONL file (records with ``prompt``) or a text file (one a line).

    ValueError naming the file and line of a malformed record, a prompt over
    :data:`MAX_PROMPT_CHARS` characters or bytes that are not UTF-8. Blank lines are skipped.
    """
    from .preferences import read_jsonl
    from .rollout import prompt_texts

    path = Path(path)
    lines = [(i, line) for i, line in enumerate(read_text_file(path, "prompt file").splitlines(), 1) if line.strip()]
    for i, line in lines:
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"{path} line {i}: {len(line):,} characters, longer than the {MAX_PROMPT_CHARS:,} a "
                             f"prompt may have")
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, record in read_jsonl(path, "prompt"):
        try:
            (prompt,) = prompt_texts([record])
        except ValueError as e:
            raise ValueError(f"{path} line {i}: {str(e).removeprefix('prompts[0]').lstrip(': ')}") from None
        out.append((i, prompt))
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """The distinct prompts of a JSONL file (records with a ``prompt`` field) or a text file (one prompt per line).

    Duplicates are dropped (first one kept); fewer than 2 distinct prompts (one to train on,
    one held out) is a ValueError naming the file. See :func:`prompt_file_lines` for the rest.
    """
    lines = prompt_file_lines(path)
    out = list(_distinct(p for _, p in lines).values())
    if len(out) < 2:
        dup = f" ({len(lines)} lines, duplicates removed)" if len(lines) > len(out) else ""
        raise ValueError(f"{path}: needs at least 2 distinct prompts (training and held-out), found {len(out)}{dup}")
    return out


def _distinct(prompts) -> dict:
    """{key: prompt} of the distinct prompts in first-seen order (a list of chat messages keyed by its JSON)."""
    out: dict = {}
    for p in prompts:
        out.setdefault(p if isinstance(p, str) else json.dumps(p, sort_keys=True), p)
    return out


def check_prompt_lengths(path: str | Path, tokenizer, max_new_tokens: int) -> None:
    """ValueError naming the file and line of the first prompt that leaves no room for ``max_new_tokens`` replies."""
    from .tokenizer import format_prompt

    ctx = tokenizer.model_max_length
    limit = ctx - max_new_tokens
    for i, prompt in prompt_file_lines(path):
        n = len(tokenizer(format_prompt(prompt, tokenizer))["input_ids"])
        if n > limit:
            raise ValueError(f"{path} line {i}: the prompt is {n} tokens; the model's context of {ctx} minus "
                             f"max_new_tokens={max_new_tokens} allows at most {limit}")


def _train_eval_split(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a seeded shuffle, the last ``n_eval`` held out (at most half of them)."""
    import random

    distinct = _distinct(prompts)
    order = [distinct[k] for k in sorted(distinct)]
    if len(order) < 2:
        raise ValueError(f"needs at least 2 distinct prompts (training and held-out), found {len(order)}")
    random.Random(seed).shuffle(order)
    k = min(n_eval, len(order) // 2)
    return order[:-k], order[-k:]


def _read_table_file(path: Path) -> dict:
    """Parse a TOML or JSON file; ValueError naming the file on a syntax error."""
    text = read_text_file(path, "config file")
    if path.suffix == ".json":
        try:
            return json.loads(text)
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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None


def _parse_value(text: str):
    """A command-line value read as TOML (``0.1``, ``true``, ``"head"``); ``none`` is None; anything else a string."""
    if text.strip().lower() in ("none", "null"):
        return None
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str]) -> dict[str, dict]:
    """``["--ppo.kl_coef", "0.1", ...]`` -> ``{"ppo": {"kl_coef": 0.1}}``; ValueError naming a malformed argument."""
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or "." not in key:
            raise ValueError(f"unrecognised argument {arg!r}: overrides are written --TABLE.FIELD VALUE, e.g. --ppo.kl_coef 0.1")
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"{arg} needs a value")
            value, i = args[i + 1], i + 1
        table, field_name = key[2:].split(".", 1)
        out.setdefault(table, {})[field_name] = _parse_value(value)
        i += 1
    return out


def load_config(path: str | Path, overrides: dict[str, dict] | None = None) -> dict:
    """Read a TOML or JSON config into ``{"pipeline": {...}, ALGORITHM: {...}}``, overrides applied, every value checked."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config {path} is a directory, not a file")
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    raw = _read_table_file(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected tables [pipeline] and [ppo] (or [a2c]), got a {type(raw).__name__}")
    for table, value in raw.items():
        if not isinstance(value, dict):
            raise ValueError(f"{path}: [{table}] must be a table of key = value lines, got {value!r}")
    for table, values in (overrides or {}).items():  # command-line --TABLE.FIELD VALUE
        raw[table] = {**raw.get(table, {}), **values}
    pipe = dict(raw.get("pipeline", {}))
    algo = pipe.get("algorithm", PIPELINE_DEFAULTS["algorithm"])
    unknown = sorted(set(raw) - {"pipeline", algo})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; expected [pipeline] and [{algo}] "
                         "(the second table is named after [pipeline] algorithm)")
    bad = sorted(set(pipe) - set(PIPELINE_DEFAULTS))
    if bad:
        raise ValueError(f"{path}: unknown [pipeline] key(s) {bad}{_did_you_mean(bad, PIPELINE_DEFAULTS)}")
    if pipe.get("out_dir") is None:
        pipe["out_dir"] = str(Path("runs") / path.stem)
    try:
        pipe = asdict(PipelineConfig(**pipe))
        config_cls, _ = _algorithm(pipe["algorithm"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    table = dict(raw.get(algo, {}))
    try:
        config_cls.from_dict(table)
    except ValueError as e:
        raise ValueError(f"{path}: [{algo}] {e}") from None
    return {"pipeline": pipe, algo: table}


def _did_you_mean(bad: list[str], known) -> str:
    import difflib

    hints = [f"{b!r} -> {m[0]!r}" for b in bad if (m := difflib.get_close_matches(b, list(known), n=1))]
    return f"; did you mean {', '.join(hints)}?" if hints else f"; known: {sorted(known)}"


def _table_defaults(table: str) -> dict:
    """Each field's default of an algorithm's config table (empty for a table this version does not know)."""
    try:
        return {f.name: f.default for f in fields(_algorithm(table)[0])}
    except ValueError:
        return {}


def _check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is a directory or can become one (not a file, not under a file)."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"out_dir {out}: {p} is a file, not a directory; choose another out_dir (--out)")
            break


def _check_resume(out: Path, record: dict, checkpoint_name: str) -> None:
    """Refuse to continue a run in ``out`` whose recorded config differs (beyond what may change on resume).

    Checked before anything is written. The record is ``run_config.json``; without it (a
    checkpoint made by the Python API, or copied by hand), the record the checkpoint carries
    (``run_record``, written by this command) or else its algorithm table alone.
    """
    saved_path = out / RUN_CONFIG_NAME
    if not (out / checkpoint_name).exists():
        return
    if saved_path.exists():
        try:
            saved = json.loads(read_text_file(saved_path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{saved_path}: unreadable ({e}); it records the run's config, so the run cannot be "
                             f"checked and continued: start a new run in another out_dir (--out)") from None
    else:
        from .checkpoint import load_checkpoint

        state = load_checkpoint(out / checkpoint_name)
        algo = next(t for t in record if t != "pipeline")
        saved = state.get("run_record") or {algo: state.get("config", {})}
        record = {t: record[t] for t in saved if t in record}
    changed = []
    for table in sorted((set(saved) | set(record)) - {"threads_used", "processes"}):
        allowed = RESUMABLE_PIPELINE_KEYS if table == "pipeline" else RESUMABLE_FIELDS
        defaults = PIPELINE_DEFAULTS if table == "pipeline" else _table_defaults(table)
        changed += [f"[{table}] {c}" for c in config_changes(saved.get(table, {}), record.get(table, {}), allowed,
                                                             defaults)]
    if changed:
        raise ValueError(
            f"{out} holds a run made with another config ({'; '.join(changed)}). Put those values back to continue "
            f"it, or give the changed config another out_dir (--out) to start a new run."
        )


def _prompts(pipe: dict) -> tuple[list, list]:
    """(train, held-out) prompts: the reader's file split by ``split_seed``, or the book's split."""
    if pipe["prompts"] is not None:
        return _train_eval_split(read_prompt_file(pipe["prompts"]), pipe["n_eval"], pipe["split_seed"])
    from .corpus import prompt_split

    return prompt_split(pipe["split_seed"], pipe["n_eval"])


def run_pipeline(config: dict, iterations: int | None = None, progress: bool = True) -> dict:
    """Base LM -> reward model -> RL as ``config`` (from :func:`load_config`) says; returns a summary dict."""
    from .base_model import load_base_model
    from .critic import build_critic
    from .distributed import make_accelerator
    from .gold import gold_reward_fn
    from .rollout import prompt_texts
    from .runtime import configure_threads, get_device, set_seed
    from .trainer import save_history

    pipe = dict(config["pipeline"])
    if iterations is not None:
        pipe["iterations"] = iterations
    pipe = asdict(PipelineConfig(**pipe))  # checks an --iterations override too
    algo = pipe["algorithm"]
    config_cls, trainer_cls = _algorithm(algo)
    out = Path(pipe["out_dir"])
    table = dict(config.get(algo, {}))
    if pipe["critic"] in ("head", "separate"):  # the trainer builds these itself; [pipeline] critic decides
        if table.get("critic", pipe["critic"]) != pipe["critic"]:
            raise ValueError(f"[pipeline] critic = {pipe['critic']!r} but [{algo}] critic = {table['critic']!r}: "
                             "set one of them")
        table["critic"] = pipe["critic"]
    cfg = config_cls.from_dict({**table, "progress": progress})
    record = {"pipeline": pipe, algo: {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    _check_out_dir(out)
    _check_resume(out, record, trainer_cls.checkpoint_name)  # before run_config.json is (re)written
    device = get_device(pipe["device"])  # an unavailable device fails here, before anything is written
    # one process (python), or N under `accelerate launch` / `torchrun`: then each has its own device
    accelerator = make_accelerator(device)
    if accelerator.num_processes > 1:
        device = accelerator.device
    main = accelerator.is_main_process
    say = print if main else (lambda *a, **k: None)
    train, eval_set = _prompts(pipe)
    threads = configure_threads(pipe["threads"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_CONFIG_NAME).write_text(json.dumps({**record, "threads_used": threads,
                                                       "processes": accelerator.num_processes}, indent=1))
    set_seed(cfg.seed)

    say(f"[1/3] base LM ({pipe['preset']})", flush=True)
    policy, tok = load_base_model(pipe["preset"], device=device, progress=progress and main)
    if pipe["prompts"] is not None:  # before any prompt reaches the preference stage or a batch
        check_prompt_lengths(pipe["prompts"], tok, cfg.max_new_tokens)
    ref, _ = load_base_model(pipe["preset"], device=device, progress=False)
    rm = None
    if pipe["reward"] == "model":
        from .reward_model import load_reward_model, reward_fn_from_model

        say(f"[2/3] reward model ({pipe['preset']})", flush=True)
        own = prompt_texts(train) if pipe["prompts"] is not None else None
        rm, rm_tok = load_reward_model(pipe["preset"], device=device, progress=progress and main, prompts=own)
        reward_fn = reward_fn_from_model(rm, rm_tok)
    else:
        say("[2/3] reward: the gold reward (no reward model)", flush=True)
        reward_fn = gold_reward_fn
    critic = build_critic("reward_model", reward_model=rm) if pipe["critic"] == "reward_model" else None

    resumed = (out / trainer_cls.checkpoint_name).exists()
    say(f"[3/3] {trainer_cls.name}, {pipe['iterations']} iterations -> {out}" + (" (resuming)" if resumed else "")
        + (f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""), flush=True)
    trainer = trainer_cls(policy, ref, tok, reward_fn, cfg, critic=critic,
                          gold_fn=gold_reward_fn if pipe["gold"] else None, accelerator=accelerator)
    trainer.run_record = record  # the checkpoint carries it, so a resume without run_config.json is checked too
    history = trainer.train(train, pipe["iterations"], checkpoint_dir=out, eval_prompts=eval_set)
    if trainer.iteration > pipe["iterations"]:
        say(f"note: {out} holds a finished run of {trainer.iteration} iterations, more than the {pipe['iterations']} "
            f"asked for: nothing was trained and the results are those of the {trainer.iteration}-iteration run "
            f"(a run cannot be shortened; use another out_dir for a shorter one)", flush=True)
    trainer.export(out / "policy")  # every process takes part; the main one writes
    final = trainer.evaluate(eval_set, n_samples=pipe["n_samples"])
    first = next((h for h in history if "eval_proxy_reward" in h), {})
    summary = {
        "iterations": trainer.iteration,
        "processes": accelerator.num_processes,
        "eval_gold_reward_start": first.get("eval_gold_reward"),
        "eval_gold_reward_end": final.get("eval_gold_reward"),
        "eval_proxy_reward_start": first.get("eval_proxy_reward"),
        "eval_proxy_reward_end": final.get("eval_proxy_reward"),
        "eval_kl_end": final.get("eval_kl"),
        "out_dir": str(out),
        "policy": str(out / "policy"),
    }
    if not main:
        return summary
    save_history(history, out / "history.json")

    import matplotlib.pyplot as plt

    from .plotting import plot_run

    fig = plot_run(history, title=f"{trainer_cls.name} on {pipe['preset']} ({pipe['reward']} reward)",
                   xlabel=f"{trainer_cls.name} iteration")
    fig.savefig(out / "diagnostics.png", dpi=100)
    plt.close(fig)
    with (out / "samples.jsonl").open("w") as f:
        for s in final.pop("eval_samples"):
            f.write(json.dumps(s) + "\n")
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


def _print_options(table: str) -> None:
    """Every field of a config table: name, type, default, valid values, help."""
    python_only = {"dpo": "DPOConfig", "critic_free": "CriticFreeConfig"}  # not pipeline algorithms (chapters 6, 7)
    if table == "dpo":
        from .dpo import DPOConfig as cls
    elif table == "critic_free":
        from .critic_free import CriticFreeConfig as cls
    else:
        cls = PipelineConfig if table == "pipeline" else _algorithm(table)[0]
    how = (f"rlhf_book.{python_only[table]}(FIELD=VALUE) in Python" if table in python_only
           else f"override with --{table}.FIELD VALUE")
    print(f"[{table}]  ({cls.__name__}; {how})")
    for d in describe(cls):
        valid = f"  valid: {d['valid']}" if d["valid"] else ""
        print(f"  {d['name']} = {json.dumps(d['default'])}   ({d['type']}{valid})\n      {d['help']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rlhf-book`` / ``python -m rlhf_book.cli``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="rlhf-book", description="RLHF on a GPT trained from scratch: base LM -> reward model -> PPO or A2C."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pipeline", help="base LM -> reward model -> RL, as a config file says (resumable)",
                       epilog="Any config field can be overridden: --pipeline.FIELD VALUE or --ppo.FIELD VALUE "
                              "(list them with `rlhf-book options ppo`).")
    p.add_argument("--config", required=True, help="TOML or JSON file with [pipeline] and [ppo] (or [a2c]) tables")
    p.add_argument("--iterations", type=int, default=None,
                   help="override [pipeline] iterations (a larger number continues a run)")
    p.add_argument("--out", default=None, help="override [pipeline] out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    o = sub.add_parser("options", help="list the fields of a config table with their defaults, valid values and help")
    o.add_argument("table", nargs="?", default="ppo", choices=("pipeline", *ALGORITHMS, "dpo", "critic_free"))
    for name, helptext in (("base", "build and cache the base LM"), ("reward", "build and cache the reward model")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--preset", default="cpu", help="tiny, cpu or gpu")
        q.add_argument("--device", default=None)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "pipeline":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    import matplotlib

    matplotlib.use("Agg")  # files only, no windows
    try:
        if args.command == "pipeline":
            config = load_config(args.config, parse_overrides(rest))
            if args.out is not None:
                config["pipeline"]["out_dir"] = args.out
            summary = run_pipeline(config, iterations=args.iterations, progress=not args.no_progress)
            if int(os.environ.get("RANK", "0")) == 0:  # one summary, from the main process
                print(json.dumps(summary, indent=1))
        elif args.command == "options":
            _print_options(args.table)
        elif args.command == "base":
            _build_base(args)
        else:
            _build_reward(args)
    except ValueError as e:
        print(f"rlhf-book: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system that refuses: a path that is a file, read-only, full, ...
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"rlhf-book: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
