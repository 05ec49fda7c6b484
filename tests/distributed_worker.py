"""What tests/test_distributed.py launches with 1 or 2 processes (``torchrun`` / ``accelerate launch``, gloo on CPU).

    python tests/distributed_worker.py update BASE_DIR OUT.pt              # one process
    torchrun --nproc_per_node 2 tests/distributed_worker.py update BASE_DIR OUT.pt
    accelerate launch --num_processes 2 --cpu tests/distributed_worker.py train BASE_DIR RUN_DIR ITERATIONS

``update``: every algorithm's update on one fixed global batch (sampled identically on every
process, then split into the processes' shares); the main process saves the parameters and
statistics after it, so N processes can be compared with one. ``train``: a short PPO run with
checkpoints in RUN_DIR (resumable, with any number of processes); each process also writes
the mean length of the replies it sampled, so the test can check the logged statistics are
those of the global batch.
"""

import json
import sys
from pathlib import Path

import rlhf_book  # noqa: F401  (before torch)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_book import A2CConfig, A2CTrainer, CriticFreeConfig, CriticFreeTrainer, DPOConfig, DPOTrainer, PPOConfig, PPOTrainer
from rlhf_book.distributed import finish
from rlhf_book.rollout import generate

torch.set_num_threads(1)
PROMPTS = [f"Review {i}: the food was" for i in range(8)] + [f"Review {i}: the room was" for i in range(8)]


def reward_fn(prompts, responses, terminated):
    """A reward of the text alone: longer replies with more vowels score higher."""
    return torch.tensor([len(r) / 20 + sum(c in "aeiou" for c in r) / 10 for r in responses])


def load(base: str):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    return AutoModelForCausalLM.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base), tok


def fixed_rollout(lm, tok, prompts, k=1):
    """The same global batch on every process: a private generator, the unwrapped policy."""
    return generate(lm, tok, prompts, 8, 1.0, generator=torch.Generator().manual_seed(123), samples_per_prompt=k)


def update(base: str, out: str) -> None:
    results = {}
    common = dict(max_new_tokens=8, progress=False, seed=0)
    for name, trainer_cls, cfg in [
        ("ppo", PPOTrainer, PPOConfig(batch_size=8, minibatch_size=8, ppo_epochs=2, kl_coef=0.05, **common)),
        ("a2c", A2CTrainer, A2CConfig(batch_size=8, value_updates=2, whiten_advantages=True, **common)),
        ("grpo", CriticFreeTrainer, CriticFreeConfig(batch_size=4, num_generations=2, scale_rewards="batch",
                                                     whiten_advantages=True, num_iterations=2, loss_type="dapo",
                                                     **common)),
        ("rloo", CriticFreeTrainer, CriticFreeConfig(batch_size=4, num_generations=2, advantage="rloo", kl_coef=0.05,
                                                     kl_penalty="reward", loss_type="grpo", **common)),
    ]:
        policy, ref, tok = load(base)
        tr = trainer_cls(policy, ref, tok, reward_fn, cfg)
        k = getattr(cfg, "num_generations", 1)
        full = fixed_rollout(tr.lm, tok, PROMPTS[: cfg.batch_size], k)
        rows = tr.shard(range(len(full)))
        stats = tr.learn(full.select(rows))
        results[name] = {"params": {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, "stats": stats}
    policy, ref, tok = load(base)
    tr = DPOTrainer(policy, ref, tok, DPOConfig(batch_size=8, beta=0.1, progress=False))
    pairs = [{"prompt": p, "chosen": " good and tasty.", "rejected": " bad"} for p in PROMPTS[:8]]
    tr.pairs, tr.ref_logps = tr.prepare(pairs)
    stats = tr.step(range(8))
    results["dpo"] = {"params": {k: v.detach().clone() for k, v in tr.lm.state_dict().items()}, "stats": stats}
    if tr.is_main:
        torch.save({"world": tr.world, **results}, out)
    tr.accelerator.wait_for_everyone()


def train(base: str, run_dir: str, iterations: str) -> None:
    policy, ref, tok = load(base)
    cfg = PPOConfig(batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=8, eval_every=2, checkpoint_every=1,
                    progress=False)
    tr = PPOTrainer(policy, ref, tok, reward_fn, cfg)
    lengths = []
    step = tr.step

    def recording_step(prompts):
        stats = step(prompts)
        lengths.append(tr.experience.rollout.response_lengths.float().mean().item())
        return stats

    tr.step = recording_step
    history = tr.train(PROMPTS, int(iterations), checkpoint_dir=run_dir, eval_prompts=PROMPTS[:4])
    Path(run_dir, f"local_lengths.{tr.world}.{tr.rank}.json").write_text(json.dumps(lengths))
    if tr.is_main:
        Path(run_dir, f"history.{tr.world}.json").write_text(json.dumps(history))
        tr.export(Path(run_dir) / "policy")
    else:
        tr.export(Path(run_dir) / "policy")


if __name__ == "__main__":
    {"update": update, "train": train}[sys.argv[1]](*sys.argv[2:])
    finish()  # the process group destroyed before the interpreter exits (a launched script's last line)
