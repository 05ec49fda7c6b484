"""Supervised fine-tuning (SFT) of any causal LM on demonstrations: the stage before RLHF.

The loss is the negative log-likelihood of the demonstrated reply given its prompt, averaged over
the reply's tokens (the token mean over the whole batch, as TRL's ``SFTTrainer`` takes it):

    L_SFT = - sum_{i, t} log pi(y_{i,t} | x_i, y_{i,<t}) / sum_i |y_i|

The prompt's tokens are context only: they are masked out of the loss. A reply is teacher-forced
exactly as the policy would have produced it when sampling (:func:`rlhf_book.rollout.teacher_forcing_batch`):
``format_prompt(prompt, tokenizer)`` (the chat template, for a tokenizer with one), then the reply's
tokens, then EOS, which the loss includes, so the model learns to end its turn.

Records use TRL's formats (one per JSONL line for :func:`load_sft_records`):

* prompt-completion: ``{"prompt": ..., "completion": ...}``, the prompt a string or a list of
  ``{"role", "content"}`` messages, the completion a string or a list of one assistant message;
* conversational: ``{"messages": [...]}``. The last message must be the assistant's; it is the
  completion and every message before it is the prompt (so in a multi-turn record the earlier
  assistant turns are context, not trained on).

Messages need a tokenizer with a chat template. Extra fields are allowed and ignored.

:class:`SFTTrainer` is one of the book's trainers (:class:`~rlhf_book.trainer.PolicyTrainer`):
minibatches accumulated into one optimizer step, the held-out completion NLL
(:meth:`SFTTrainer.evaluate_records`, ``val_*``), optionally the same sampled evaluation as every
RL trainer (``eval_*``), checkpoint/resume bit for bit and export. It needs no reference model and
no reward; with a ``ref_model`` its evaluation also reports the KL to it. Sequence packing is not
implemented: every record is its own row, left-padded prompt and right-padded reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import option
from .distributed import gather_rows
from .preferences import read_jsonl, validate_all
from .rollout import _context_size, response_logprobs, teacher_forcing_batch
from .tokenizer import check_prompt, encode_prompt_response, is_messages
from .trainer import OfflineConfig, PolicyTrainer

__all__ = ["SFTConfig", "SFTTrainer", "sft_example", "validate_sft_record", "validate_sft_records", "load_sft_records",
           "completion_nll", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "sft_state.pt"


def _completion_text(value, where: str) -> str:
    """The reply of a ``completion`` field: a non-empty string, or a list of one assistant message."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field 'completion' is empty")
        return value
    if is_messages(value):
        msgs = check_prompt(value, f"{where}: field 'completion'")
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise ValueError(f"{where}: field 'completion' must be a string or a list of one assistant message, "
                             f"got roles {[m['role'] for m in msgs]}")
        return msgs[0]["content"]
    raise ValueError(f"{where}: field 'completion' must be a string or a list of one assistant message, "
                     f"got {type(value).__name__}")


def sft_example(record, where: str = "record") -> tuple:
    """(prompt, completion text) of an SFT record in one of TRL's formats (see the module docstring).

    The prompt is a string or a list of messages (:func:`rlhf_book.tokenizer.format_prompt`
    formats it); ValueError names ``where`` and the field.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'completion', or 'messages', "
                         f"got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise ValueError(f"{where}: a record has either 'messages' or 'prompt' and 'completion', not both")
        msgs = check_prompt(record["messages"], f"{where}: field 'messages'")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field 'messages': the last message must be the assistant's (the reply to "
                             f"learn), got role {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise ValueError(f"{where}: field 'messages' holds only the assistant's reply: it needs a prompt before it")
        if not msgs[-1]["content"].strip():
            raise ValueError(f"{where}: field 'messages': the last (assistant) message is empty")
        return msgs[:-1], msgs[-1]["content"]
    for field in ("prompt", "completion"):
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r} (a record needs 'prompt' and 'completion', or 'messages')")
    return check_prompt(record["prompt"], f"{where}: field 'prompt'"), _completion_text(record["completion"], where)


def validate_sft_record(record, where: str = "record", tokenizer=None, max_length: int | None = None) -> dict:
    """Check one SFT record and return it; ValueError naming ``where`` (e.g. ``data.jsonl line 3``) and the field.

    With a ``tokenizer`` the prompt must be formattable (messages need a chat template) and
    prompt + completion + EOS must fit in ``max_length`` tokens (default ``tokenizer.model_max_length``).
    """
    prompt, completion = sft_example(record, where)
    if tokenizer is not None:
        try:
            (ids,) = encode_prompt_response(tokenizer, [prompt], [completion])
        except ValueError as e:
            raise ValueError(f"{where}: {str(e).removeprefix('prompts[0]: ')}") from None
        limit = max_length if max_length is not None else tokenizer.model_max_length
        if limit is not None and limit < 1e9 and len(ids) > limit:
            raise ValueError(f"{where}: prompt + completion + EOS is {len(ids)} tokens, longer than the context "
                             f"window of {limit}")
    return record


def validate_sft_records(records: Sequence, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """:func:`validate_sft_record` of every record; errors name ``record i`` (0-based)."""
    return validate_all(records, validate_sft_record, "an SFT data set needs at least one record", tokenizer,
                        max_length)


def load_sft_records(path: str | Path, tokenizer=None, max_length: int | None = None) -> list[dict]:
    """Read and validate an SFT JSONL file (UTF-8, one record a line); ValueError names ``<path> line N`` and the field."""
    path = Path(path)
    return [validate_sft_record(rec, f"{path} line {i}", tokenizer, max_length) for i, rec in read_jsonl(path, "SFT")]


def completion_nll(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL of each reply's tokens, number of them), (B,) each, of a teacher-forcing batch: prompts masked out."""
    lp = response_logprobs(model, batch)
    mask = batch.response_mask
    return -(lp.float() * mask).sum(-1), mask.sum(-1).float()


@dataclass
class SFTConfig(OfflineConfig):
    """:class:`~rlhf_book.trainer.OfflineConfig` plus SFT's own fields (``batch_size`` counts records per step)."""

    eval_batch_size: int = option(64, "records per forward pass of the held-out NLL", ">= 1")


class SFTTrainer(PolicyTrainer):
    """Supervised fine-tuning of a causal LM (any architecture, or a ``peft.PeftModel``) on prompt/completion records.

    ``SFTTrainer(policy, tokenizer, config=SFTConfig(...), ref_model=None, reward_fn=None, gold_fn=None)``:
    the policy is trained in place. ``ref_model`` (optional, a frozen copy) only adds ``eval_kl``
    to :meth:`evaluate`; ``reward_fn`` / ``gold_fn`` (optional) only score held-out samples there.
    """

    name = "SFT"
    checkpoint_name = CHECKPOINT_NAME
    config_class = SFTConfig
    needs_reference = False

    def __init__(self, policy: nn.Module, tokenizer, config: SFTConfig | None = None, *, ref_model: nn.Module | None = None,
                 reward_fn: Callable | None = None, gold_fn: Callable | None = None, accelerator=None):
        super().__init__(policy, ref_model, tokenizer, config, reward_fn, gold_fn, accelerator)
        self.setup_policy_optimizer()
        self.examples: list[tuple] = []
        self.n_tokens: list[int] = []

    # ------------------------------------------------------------------ the data
    def prepare(self, records: Sequence) -> tuple[list[tuple], list[int]]:
        """(prompt, completion) of every record, checked against this tokenizer and the model's context, and the
        number of loss tokens (completion + EOS) of each."""
        records = validate_sft_records(records, self.tokenizer, _context_size(self.lm))
        examples = [sft_example(r) for r in records]
        ids = self.tokenizer([c for _, c in examples], add_special_tokens=False)["input_ids"]
        return examples, [len(x) + 1 for x in ids]

    def loss_terms(self, examples: Sequence[tuple], model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, loss tokens) per example, (B,) each, under the current policy (with grad unless in no_grad)."""
        batch = teacher_forcing_batch(self.tokenizer, [p for p, _ in examples], [c for _, c in examples], device=self.device)
        with self.autocast():
            return completion_nll(model if model is not None else self.lm, batch)

    # ------------------------------------------------------------------ one step
    def step(self, rows: Sequence[int]) -> dict:
        """One optimizer step on the records ``rows`` of the prepared data set (micro-batches accumulated); its stats.

        The loss is the token mean over the global batch's completions (each process's part
        weighted by its share of the tokens, :meth:`~rlhf_book.trainer.PolicyTrainer.loss_share`).
        """
        t0 = time.perf_counter()
        rows = self.process_rows(rows)
        chunks = [rows[c] for c in self.micro_batches(len(rows))]  # gradient_accumulation_steps micro-batches
        n_chunks = [float(sum(self.n_tokens[i] for i in chunk)) for chunk in chunks]
        sums, counts = [], []
        self.lm.train()
        model = self.compiled(self.trainable(self.lm))

        def loss_fn(k):  # the token mean of micro-batch k; accumulate scales it to its share of the global batch
            nll, n = self.loss_terms([self.examples[i] for i in chunks[k]], model)
            sums.append(nll.detach())
            counts.append(n)
            return nll.sum() / n_chunks[k], {}

        grad_norm = self.accumulate(range(len(chunks)), loss_fn, self.params, n_chunks)["grad_norm"]
        total = gather_rows(self.accelerator, torch.cat(sums)).sum()
        tokens = gather_rows(self.accelerator, torch.cat(counts)).sum()
        self.iteration += 1
        return {"step": self.iteration, "loss": (total / tokens).item(), "tokens": int(tokens.item()),
                "grad_norm": float(grad_norm), "step_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate_records(self, records: Sequence) -> dict:
        """The held-out completion NLL (token mean, ``val_loss``), its perplexity and token count; keys ``val_*``."""
        examples, _ = self.prepare(records)
        was_training = self.lm.training
        self.lm.eval()
        try:
            bs = self.config.eval_batch_size
            parts = [self.loss_terms(examples[i: i + bs]) for i in range(0, len(examples), bs)]
        finally:
            self.lm.train(was_training)
        total = sum(float(s.sum()) for s, _ in parts)
        tokens = sum(float(n.sum()) for _, n in parts)
        loss = total / tokens
        return {"val_loss": loss, "val_perplexity": float(torch.tensor(loss).exp()), "val_tokens": int(tokens)}

    def progress_postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}"}

    # ------------------------------------------------------------------ the loop
    def train(self, records: Sequence, epochs: float = 1.0, checkpoint_dir=None, eval_records: Sequence | None = None,
              eval_prompts: Sequence | None = None, progress: bool | None = None) -> list[dict]:
        """Train for ``epochs`` passes over ``records`` (may be fractional); returns the history (one row per step).

        Step 0 (before training), every ``eval_every``-th step and the last carry the held-out
        statistics: :meth:`evaluate_records` on ``eval_records`` (``val_loss``, the completion NLL)
        and :meth:`~rlhf_book.trainer.PolicyTrainer.evaluate` on ``eval_prompts`` (``eval_*``:
        sampled replies, their rewards when a ``reward_fn`` / ``gold_fn`` was given, the KL when a
        ``ref_model`` was). Every row has ``epoch``. ``checkpoint_dir``: resumable as every
        trainer's run; calling again with more ``epochs`` extends a finished run.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs >= 0:
            raise ValueError(f"epochs must be a number >= 0, got {epochs!r}")
        self.examples, self.n_tokens = self.prepare(records)
        checks = []
        if eval_records is not None:
            self.prepare(eval_records)  # bad held-out records fail now, not at the first evaluation
            checks.append(lambda: self.evaluate_records(eval_records))
        if eval_prompts is not None:
            checks.append(lambda: self.evaluate(eval_prompts))
        evaluate = (lambda: {k: v for f in checks for k, v in f().items()}) if checks else None
        return self.run_epochs(len(self.examples), epochs, checkpoint_dir, evaluate, progress)
