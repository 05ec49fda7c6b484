"""Direct preference optimisation (Rafailov et al. 2023) and its variants: learning from pairs without a reward model.

Chapter 5's optimum of E[r] - beta KL(pi || pi_ref) is pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),
so r(x, y) = beta log(pi*(y|x) / pi_ref(y|x)) + beta log Z(x). Put this *implicit reward* into chapter 2's
Bradley-Terry loss and Z(x) cancels, because both replies share the prompt:

    L_DPO = -log sigmoid( beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with y_w the chosen and y_l the rejected reply, log pi(y|x) the summed log-probs of the reply's tokens
(:func:`rlhf_book.rollout.sequence_logprob`). The reference is frozen, so its log-probs of the data are
computed once per data set (:func:`reference_logprobs`) and reused at every step, as TRL's
``precompute_ref_log_probs`` does.

:func:`dpo_loss` has the variants behind one ``loss_type`` switch, named as TRL names them:

* ``sigmoid``: DPO, the loss above (Rafailov et al. 2023, eq. 7);
* ``hinge``: max(0, 1 - beta * delta), the SLiC-HF hinge (Zhao et al. 2023) on DPO's log-ratios;
* ``ipo``: (delta / |y| - 1 / (2 beta))^2, IPO (Azar et al. 2023, eq. 17), with each reply's log-ratio
  averaged over its tokens as TRL and the IPO authors do (the paper writes sums);
* ``sigmoid_norm``: DPO on per-token averaged log-ratios (TRL's length-normalised DPO);
* ``simpo``: -log sigmoid(beta (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma), SimPO (Meng et al. 2024):
  no reference at all, a length-normalised likelihood and a target margin gamma (TRL: ``CPOTrainer``
  with ``loss_type="simpo"``);
* ``sft``: -log pi(y_w|x) / |y_w|, supervised fine-tuning on the chosen replies alone (the rejected ones and
  the reference are not used): the baseline every preference method should beat. TRL's DPO ``loss_type="sft"``
  takes the token mean over the batch; here each reply's per-token NLL is averaged over pairs, like the others.
  It still forwards the rejected replies; for supervised fine-tuning proper (prompt/completion or
  ``messages`` records, no rejected reply, the completion's token-mean NLL) use
  :class:`rlhf_book.sft.SFTTrainer`.

:class:`DPOTrainer` trains a policy on such pairs on the book's trainer conventions (config with help
text, minibatches, checkpoint/resume bit for bit, the history schema, and the same held-out evaluation
every RL trainer runs: sampled replies scored by a proxy and a gold reward, KL to the reference by the
same estimator), reading records in TRL's columns (``prompt``/``chosen``/``rejected``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import option, redefault
from .distributed import gather_rows
from .preferences import end_token_ids, validate_preferences
from .rollout import Rollout, response_logprobs, sequence_logprob, teacher_forcing_batch
from .trainer import OfflineConfig, PolicyTrainer, TrainerConfig

__all__ = ["LOSS_TYPES", "REFERENCE_FREE", "implicit_rewards", "dpo_loss", "encode_pairs", "pair_logprobs",
           "reference_logprobs", "DPOConfig", "DPOTrainer", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "dpo_state.pt"
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "simpo", "sft")
REFERENCE_FREE = frozenset({"simpo", "sft"})  # loss types that never read the reference's log-probs
_LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm", "simpo", "sft"})


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) (up to beta log Z(x)); (B,) -> (B,)."""
    return beta * (logps - ref_logps)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of ``loss_type`` (see the module docstring) and the chosen / rejected rewards; all (B,).

    Inputs are summed reply log-probs, (B,) each; ``*_lengths`` (reply tokens, EOS
    included) are needed by the length-normalised types (``ipo``, ``sigmoid_norm``,
    ``simpo``). The rewards are the implicit rewards beta * log-ratio (``simpo``: beta *
    the per-token average log-prob, its own reward; ``sft``: the same, though its loss sees only the chosen
    reply); they are detached, for metrics.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if loss_type in _LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} averages over reply tokens: pass chosen_lengths and rejected_lengths")
    if loss_type not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs the reference's log-probs (ref_chosen_logps, ref_rejected_logps)")
    if loss_type in ("simpo", "sft"):
        chosen = chosen_logps / chosen_lengths.clamp(min=1)
        rejected = rejected_logps / rejected_lengths.clamp(min=1)
        losses = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma) if loss_type == "simpo" else -chosen
        return losses, (beta * chosen).detach(), (beta * rejected).detach()
    chosen = chosen_logps - ref_chosen_logps  # log-ratios log pi / pi_ref
    rejected = rejected_logps - ref_rejected_logps
    if loss_type in _LENGTH_NORMALISED:
        delta = chosen / chosen_lengths.clamp(min=1) - rejected / rejected_lengths.clamp(min=1)
    else:
        delta = chosen - rejected
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: beta is IPO's tau; the loss pulls the averaged log-ratio gap to 1 / (2 tau)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def encode_pairs(tokenizer, pairs: Sequence[dict], device=None) -> Rollout:
    """Chosen and rejected replies of ``pairs`` as one teacher-forcing batch: 2N rows, chosen first, then rejected.

    Prompts (strings or messages) go through :func:`rlhf_book.rollout.encode_prompts` (the prompt format, left
    padding) and replies are right-padded, EOS appended unless a record says
    ``*_terminated: false`` (the record's ``*_eos`` token when it names one, see
    :mod:`rlhf_book.preferences`): exactly the tokens the policy would have produced when sampling
    (:func:`rlhf_book.rollout.teacher_forcing_batch`).
    """
    prompts = [p["prompt"] for p in pairs] * 2
    replies = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ended = [p.get("chosen_terminated", True) for p in pairs] + [p.get("rejected_terminated", True) for p in pairs]
    eos_ids = end_token_ids(tokenizer, pairs, "chosen") + end_token_ids(tokenizer, pairs, "rejected")
    return teacher_forcing_batch(tokenizer, prompts, replies, ended, device, eos_ids)


def pair_logprobs(model: nn.Module, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_w|x), log pi(y_l|x)), (N,) each, of an :func:`encode_pairs` batch: one forward of 2N rows."""
    logps = sequence_logprob(response_logprobs(model, batch), batch.response_mask)
    return logps.chunk(2)


@torch.no_grad()
def reference_logprobs(ref_model: nn.Module, tokenizer, pairs: Sequence[dict], batch_size: int = 128) -> torch.Tensor:
    """log pi_ref of every chosen and rejected reply, (N, 2): computed once, as the reference never changes."""
    device = next(ref_model.parameters()).device
    was_training = ref_model.training
    ref_model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chosen, rejected = pair_logprobs(ref_model, encode_pairs(tokenizer, pairs[i: i + batch_size], device))
        out.append(torch.stack([chosen, rejected], dim=1).float())
    ref_model.train(was_training)
    return torch.cat(out)


def _digest(pairs: Sequence[dict]) -> str | None:
    """A name for a data set's contents (which replies, which EOS flags), to cache its reference log-probs by.

    None when ``pairs`` is not a list of such records (:func:`~rlhf_book.preferences.validate_preferences` says why).
    """
    try:
        rows = [(p["prompt"], p["chosen"], p["rejected"], p.get("chosen_terminated", True), p.get("rejected_terminated", True))
                + tuple(p[k] for k in ("chosen_eos", "rejected_eos") if k in p) for p in pairs]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


@dataclass
class DPOConfig(OfflineConfig):
    """:class:`~rlhf_book.trainer.OfflineConfig` plus DPO's own fields; defaults are chapter 6's CPU recipe."""

    beta: float = option(0.1, "beta: the KL coefficient the implicit reward assumes (small: the policy may move "
                              "far from pi_ref; for 'ipo' it is IPO's tau)", "> 0")
    loss_type: str = option("sigmoid", "'sigmoid' (DPO), 'hinge' (SLiC), 'ipo' (IPO), 'sigmoid_norm' (DPO on "
                                       "per-token log-ratios), 'simpo' (SimPO, no reference) or 'sft' (supervised "
                                       "fine-tuning on the chosen replies): TRL's names",
                            choices=LOSS_TYPES)
    simpo_gamma: float = option(0.5, "SimPO's target reward margin gamma (only loss_type='simpo')", ">= 0")
    ref_batch_size: int = option(128, "pairs per forward pass when the reference's log-probs are precomputed", ">= 1")
    lr: float = redefault(TrainerConfig, "lr", 1e-4)


class DPOTrainer(PolicyTrainer):
    """Train a causal LM on preference pairs with :func:`dpo_loss`: an optimizer step per batch of pairs.

    ``policy`` (trained in place) and ``ref_model`` (a separate frozen copy; None for a ``peft.PeftModel``
    policy: the policy with its adapters disabled, no second copy) as for the RL
    trainers; ``reward_fn`` (optional) and ``gold_fn`` (optional) only score the held-out
    replies in :meth:`evaluate` (DPO never calls a reward model while training): with
    both, a DPO run is measured exactly as a PPO run is.
    """

    name = "DPO"
    checkpoint_name = CHECKPOINT_NAME
    config_class = DPOConfig

    def __init__(self, policy: nn.Module, ref_model: nn.Module, tokenizer, config: DPOConfig | None = None,
                 reward_fn: Callable | None = None, gold_fn: Callable | None = None, accelerator=None):
        super().__init__(policy, ref_model, tokenizer, config, reward_fn, gold_fn, accelerator)
        self.setup_policy_optimizer()
        self._ref_cache: dict[str, torch.Tensor] = {}
        self.pairs: list[dict] = []
        self.ref_logps: torch.Tensor | None = None

    # ------------------------------------------------------------------ the data
    def prepare(self, pairs: Sequence[dict]) -> tuple[list[dict], torch.Tensor]:
        """Check ``pairs`` (errors name the record and field) and return them with their reference log-probs (N, 2).

        The reference's log-probs are computed on first use and cached per data set, so
        a data set costs one reference pass however many epochs, evaluations or resumes use it.
        """
        key = _digest(pairs)
        if key not in self._ref_cache:  # a data set seen before was checked then
            pairs = validate_preferences(pairs, self.tokenizer)
            key = _digest(pairs)
            if self.config.loss_type in REFERENCE_FREE:
                self._ref_cache[key] = torch.zeros(len(pairs), 2, device=self.device)
            else:
                with self.autocast():
                    self._ref_cache[key] = reference_logprobs(self.ref, self.tokenizer, pairs, self.config.ref_batch_size)
        return list(pairs), self._ref_cache[key]

    def loss(self, pairs: Sequence[dict], ref_logps: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean :func:`dpo_loss` of ``pairs`` under the current policy (with grad), and its per-pair pieces."""
        cfg = self.config
        batch = encode_pairs(self.tokenizer, pairs, self.device)
        with self.autocast():
            chosen, rejected = pair_logprobs(self.compiled(self.trainable(self.lm)), batch)
        lengths = batch.response_lengths.float().chunk(2)
        losses, r_chosen, r_rejected = dpo_loss(
            chosen.float(), rejected.float(), ref_logps[:, 0], ref_logps[:, 1], cfg.beta, cfg.loss_type,
            lengths[0], lengths[1], cfg.simpo_gamma)
        pieces = {"loss": losses.detach(), "reward_chosen": r_chosen, "reward_rejected": r_rejected,
                  "logp_chosen": chosen.detach(), "logp_rejected": rejected.detach()}
        return losses.mean(), pieces

    @staticmethod
    def pair_stats(pieces: dict[str, torch.Tensor], prefix: str = "") -> dict:
        """Means of the per-pair pieces: loss, implicit rewards, their margin, accuracy (margin > 0), log-probs."""
        margin = pieces["reward_chosen"] - pieces["reward_rejected"]
        stats = {k: v.mean().item() for k, v in pieces.items()}
        stats.update(reward_margin=margin.mean().item(), accuracy=(margin > 0).float().mean().item())
        return {f"{prefix}{k}": v for k, v in stats.items()}

    # ------------------------------------------------------------------ one step
    def step(self, rows: Sequence[int]) -> dict:
        """One optimizer step on the pairs ``rows`` of the prepared data set (micro-batches accumulated); its stats.

        With N processes ``rows`` is the global batch: each process takes a contiguous part of
        it (sizes differ by at most one), and the statistics are of all of them.
        """
        t0 = time.perf_counter()
        rows = self.process_rows(rows)
        chunks = [rows[c] for c in self.micro_batches(len(rows))]  # gradient_accumulation_steps micro-batches
        pieces: list[dict] = []
        self.lm.train()

        def loss_fn(chunk):  # the mean over the chunk's pairs; accumulate scales it to its share of the global batch
            loss, p = self.loss([self.pairs[i] for i in chunk], self.ref_logps[chunk])
            pieces.append(p)
            return loss, {}

        grad_norm = self.accumulate(chunks, loss_fn, self.params, [len(c) for c in chunks])["grad_norm"]
        merged = {k: gather_rows(self.accelerator, torch.cat([p[k] for p in pieces])) for k in pieces[0]}
        self.iteration += 1
        return {"step": self.iteration, **self.pair_stats(merged), "grad_norm": float(grad_norm),
                "step_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate_pairs(self, pairs: Sequence[dict], batch_size: int = 128) -> dict:
        """The loss, implicit-reward accuracy and margin on held-out ``pairs``; keys ``val_*``."""
        pairs, ref = self.prepare(pairs)
        was_training = self.lm.training
        self.lm.eval()
        parts = [self.loss(pairs[i: i + batch_size], ref[i: i + batch_size])[1] for i in range(0, len(pairs), batch_size)]
        self.lm.train(was_training)
        return self.pair_stats({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, prefix="val_")

    def progress_postfix(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['accuracy']:.2f}", "margin": f"{stats['reward_margin']:.2f}"}

    # ------------------------------------------------------------------ the loop (epochs: PolicyTrainer.run_epochs)
    def train(
        self,
        pairs: Sequence[dict],
        epochs: float = 1.0,
        checkpoint_dir=None,
        eval_prompts: Sequence | None = None,
        eval_pairs: Sequence[dict] | None = None,
        progress: bool | None = None,
    ) -> list[dict]:
        """Train for ``epochs`` passes over ``pairs`` (may be fractional); returns the history (one row per step).

        ``pairs``: records with ``prompt``, ``chosen``, ``rejected`` (TRL's columns; optional
        ``*_terminated`` flags). Step 0 (before training), every ``eval_every``-th step and
        the last carry the held-out statistics: :meth:`evaluate` on ``eval_prompts``
        (``eval_*``: sampled replies, their proxy and gold rewards, KL to the reference) and
        :meth:`evaluate_pairs` on ``eval_pairs`` (``val_*``). Every row has ``epoch``.
        ``checkpoint_dir``: resumable as every trainer's run (:meth:`~rlhf_book.trainer.PolicyTrainer.run`);
        calling again with more ``epochs`` extends a finished run.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs >= 0:
            raise ValueError(f"epochs must be a number >= 0, got {epochs!r}")
        self.pairs, self.ref_logps = self.prepare(pairs)
        checks = []
        if eval_prompts is not None:
            checks.append(lambda: self.evaluate(eval_prompts))
        if eval_pairs is not None:
            self.prepare(eval_pairs)  # the reference pass happens now, not inside the first evaluation
            checks.append(lambda: self.evaluate_pairs(eval_pairs))
        evaluate = (lambda: {k: v for f in checks for k, v in f().items()}) if checks else None
        return self.run_epochs(len(self.pairs), epochs, checkpoint_dir, evaluate, progress)
