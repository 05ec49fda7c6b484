"""Two processes on CPU (gloo) compute what one computes at the same global batch; runs resume across 1 <-> 2.

The processes are real: ``torchrun --nproc_per_node 2`` and ``accelerate launch --multi_gpu
--num_processes 2`` (on a machine without CUDA the library picks the CPU and gloo) start
``tests/distributed_worker.py``, as a reader's script would be started. Each launch takes a
few seconds; the runs that train (resume across 1 <-> 2, the CLI) are marked ``slow``, so the lower-bounds leg runs
only the update comparison.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "distributed_worker.py")
ALGORITHMS = ["ppo", "a2c", "grpo", "rloo", "dpo"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args: str, launcher: str = "torchrun", module: bool = False) -> str:
    """Run the worker (or ``-m rlhf_book.cli`` with ``module``) in ``processes`` processes; returns its output."""
    target = ["-m", "rlhf_book.cli"] if module else [WORKER]
    if processes == 1:
        cmd = [sys.executable, *target, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_port()), *target, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_port()), *(["-m", "rlhf_book.cli"] if module else [WORKER]), *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def base(tiny_artifacts):
    return str(tiny_artifacts["base"])


@pytest.fixture(scope="module")
def updates(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("updates")
    launch(1, "update", base, str(d / "one.pt"))
    launch(2, "update", base, str(d / "two.pt"))
    return {n: torch.load(d / f"{n}.pt", weights_only=False) for n in ("one", "two")}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_processes_update_like_one(updates, algorithm):
    """Same global batch, split over 2 processes: the same parameters after the update, the same logged statistics."""
    one, two = updates["one"], updates["two"]
    assert (one["world"], two["world"]) == (1, 2)
    a, b = one[algorithm], two[algorithm]
    for name, p in a["params"].items():
        torch.testing.assert_close(b["params"][name], p, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    for key, value in a["stats"].items():
        if key.endswith("_seconds") or not isinstance(value, (int, float)):
            continue
        assert b["stats"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_the_update_changes_the_parameters(updates, base):
    """The comparison above is not vacuous: the parameters after the update differ from the base model's."""
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for algorithm in ALGORITHMS:
        after = {k.removeprefix("lm."): v for k, v in updates["two"][algorithm]["params"].items()}
        assert max((after[k] - v).abs().max().item() for k, v in start.items()) > 1e-6, algorithm


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # seconds per launch: the full CI leg runs it, the lower-bounds leg does not
def test_train_with_two_processes_then_resume_with_one(base, tmp_path):
    run = tmp_path / "run"
    launch(2, "train", base, str(run), "2", launcher="accelerate")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]  # one writer: no row twice
    # the logged statistics are the global batch's: the mean of the two processes' replies
    local = [json.loads((run / f"local_lengths.2.{r}.json").read_text()) for r in (0, 1)]
    for row, l0, l1 in zip(rows[1:], *local):
        assert row["response_length"] == pytest.approx((l0 + l1) / 2)
    launch(1, "train", base, str(run), "4")
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert json.loads((run / "history.1.json").read_text())[:3] == json.loads((run / "history.2.json").read_text())
    assert (run / "policy" / "model.safetensors").exists()
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow  # seconds per launch: the full CI leg runs it, the lower-bounds leg does not
def test_train_with_one_process_then_resume_with_two(base, tmp_path):
    run = tmp_path / "run"
    launch(1, "train", base, str(run), "2")
    launch(2, "train", base, str(run), "4")
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3, 4]
    history = json.loads((run / "history.2.json").read_text())
    assert history[:3] == json.loads((run / "history.1.json").read_text())


@pytest.mark.slow  # seconds per launch: the full CI leg runs it, the lower-bounds leg does not
def test_two_processes_resume_exactly(base, tmp_path):
    """Killed after step 2 and resumed with the same 2 processes = never interrupted."""
    launch(2, "train", base, str(tmp_path / "whole"), "4")
    launch(2, "train", base, str(tmp_path / "cut"), "2")
    launch(2, "train", base, str(tmp_path / "cut"), "4")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]  # noqa: E731
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "whole"))


@pytest.mark.slow  # seconds per launch: the full CI leg runs it, the lower-bounds leg does not
def test_the_pipeline_command_under_torchrun(tiny_cache_dir, tiny_artifacts, tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m rlhf_book.cli pipeline ...`: one summary, outputs written once."""
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))
    out = tmp_path / "pipe"
    stdout = launch(2, "pipeline", "--config", str(ROOT / "configs" / "ppo_tiny.toml"), "--out", str(out),
                    "--no-progress", module=True)
    assert stdout.count('"processes": 2') == 1
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3, 4]
    assert json.loads((out / "run_config.json").read_text())["processes"] == 2
    assert (out / "policy" / "config.json").exists() and (out / "summary.json").exists()


class _FakeAccelerator:
    """Looks like an Accelerator of ``world`` processes to the checks a trainer makes before any collective."""

    def __init__(self, world=2, kind="MULTI_CPU"):
        self.num_processes, self.process_index, self.is_main_process = world, 0, True
        self.device, self.distributed_type = torch.device("cpu"), kind

    def prepare_model(self, m, device_placement=None):
        return m

    def prepare_optimizer(self, o, device_placement=None):
        return o


def test_sharded_accelerators_are_refused_by_name(tiny_world):
    import copy

    from rlhf_book import PPOConfig, PPOTrainer

    lm, tok = tiny_world
    for kind in ("FSDP", "DEEPSPEED"):
        with pytest.raises(ValueError, match=f"distributed_type is {kind}.*DDP"):
            PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, lambda p, r, t: torch.zeros(len(r)),
                       PPOConfig(progress=False), accelerator=_FakeAccelerator(kind=kind))


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_world):
    import copy

    from rlhf_book import PPOConfig, PPOTrainer

    lm, tok = tiny_world
    tr = PPOTrainer(copy.deepcopy(lm), copy.deepcopy(lm), tok, lambda p, r, t: torch.zeros(len(r)),
                    PPOConfig(batch_size=3, minibatch_size=3, progress=False), accelerator=_FakeAccelerator())
    with pytest.raises(ValueError, match=r"batch_size=3 must be a multiple of the number of processes \(2\)"):
        tr.train([f"prompt {i}" for i in range(8)], 1)


def test_the_ddp_config_is_an_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate_ddp.yaml"))
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.num_processes > 1 and not cfg.use_cpu
