"""The reward model r_phi(x, y): a GPT-2 trunk with a scalar head, trained on preferences.

Architecture: Hugging Face ``GPT2ForSequenceClassification`` with ``num_labels=1``
(any ``AutoModelForSequenceClassification`` works), its trunk initialised from the
base LM and its score head from zero, so at the start every reply scores 0 and the
Bradley-Terry loss is exactly log 2. It saves and loads with plain transformers::

    AutoModelForSequenceClassification.from_pretrained(path)

Input: ``format_prompt(prompt, tokenizer) + response + EOS`` (no EOS when the reply was
cut off without one; :func:`rlhf_book.tokenizer.encode_prompt_response`). The score is
the head's output at the *last non-pad token*, whose index comes from the attention
mask, with position ids from the mask too; so left padding, right padding and any
amount of extra padding give the same score.
(HF's own pooling searches ``input_ids`` for the pad id instead.)

Training minimises the Bradley-Terry loss  -log sigmoid(r(x, y_c) - r(x, y_r))  on
:mod:`rlhf_book.preferences` data. Afterwards the score is normalised, as in
Ziegler et al. (2019), to mean 0 and std 1 on replies of the reference policy
(the base LM), so a KL coefficient means the same thing for any reward model. The
normalisation ``r = gain * raw + bias`` is stored in the model config
(``reward_gain``, ``reward_bias``) and :func:`reward_scores` applies it.

Loading it without the library: ``AutoModelForSequenceClassification`` and
``AutoTokenizer`` on the saved folder give the *raw* score as ``logits[:, 0]``, equal to
the library's ``reward_scores(..., normalize=False)``; the normalised score is
``config.reward_gain * logits[:, 0] + config.reward_bias``. (GPT-2's score head has no
bias, so the shift cannot live in the head; rewriting the trunk to hold it would change
the Bradley-Terry scale that chapter 2 calibrates.) The saved tokenizer pads on the
*right*: a plain GPT-2 forward numbers positions from column 0 whatever the mask says,
so only right padding gives it the library's scores.

Stable entry points for later chapters::

    rm, tok = load_reward_model("cpu")          # built and cached on first use
    reward_fn = reward_fn_from_model(rm, tok)   # (prompts, responses, terminated) -> (B,)

The parts work without the book's world too: :func:`reward_model_from_lm` on any causal
LM, :func:`train_reward_model` on any preference records, :func:`normalize_reward_model`
on replies of any reference policy to any prompts; ``load_reward_model("cpu", prompts=...)``
builds the book's pipeline on a reader's prompts. Ensembles (chapter 8): :func:`train_reward_ensemble`
trains k reward models on one LM's trunk, differing in seed (batch order, optionally a random
score-head start) and optionally in a random subset of the pairs; :func:`load_reward_ensemble`
does the same for the book's pipeline, each member cached under its own
:func:`~rlhf_book.cache.artifact_key`. A training *history* is a list of
per-step rows ``{"step", "loss", "accuracy", "epoch"}`` (the batch's loss and accuracy, the
1-based epoch); the rows of steps that ended an epoch with validation data also hold
``val_loss``, ``val_accuracy`` and, when the validation records carry gold scores,
``val_gold_accuracy``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .adapters import trunk
from .advantage import last_token_index
from .base_model import PRESETS, SAVE_FORMAT, WORLD_VERSION, _collate, load_base_model
from .base_model import artifact_name as base_artifact_name
from .cache import artifact_key, cache_dir, cached_artifact
from .checkpoint import resume_or_restart, rng_state, save_checkpoint, set_rng_state
from .corpus import prompt_split
from .critic import _active_head
from .export import save_model
from .preferences import (
    PREFERENCE_RECIPES,
    _is_number,
    end_token_ids,
    load_preference_data,
    preference_data_key,
    split_prompts,
    validate_preferences,
)
from .rewards import terminated_flags
from .rollout import _context_size, generate, position_ids_from_mask, prompt_texts
from .runtime import adam, autocast, dtype_kwargs, enable_tf32, get_device, resolve_dtype, set_seed
from .tokenizer import encode_prompt_response, is_messages

__all__ = [
    "RM_VERSION",
    "RewardRecipe",
    "RM_RECIPES",
    "bradley_terry_loss",
    "preference_probabilities",
    "preference_accuracy",
    "score_sequences",
    "encode_replies",
    "reward_scores",
    "score_pairs",
    "evaluate_preferences",
    "calibration_bins",
    "reward_model_from_lm",
    "train_reward_model",
    "normalize_reward_model",
    "reward_fn_from_model",
    "ModelReward",
    "build_reward_model",
    "load_reward_model",
    "save_reward_model",
    "reward_model_path",
    "reward_model_info",
    "artifact_name",
    "ensemble_member_records",
    "flip_labels",
    "init_score_head",
    "train_reward_ensemble",
    "load_reward_ensemble",
]

RM_VERSION = 2  # bump when the recipe, the input format or the normalisation changes


# ------------------------------------------------------------------- the loss
def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """BT loss mean(-log sigmoid(r_c - r_r - margin)); (B,), (B,) [, (B,) or scalar] -> scalar."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def preference_probabilities(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry P(chosen > rejected) = sigmoid(r_c - r_r); (B,), (B,) -> (B,)."""
    return torch.sigmoid(r_chosen - r_rejected)


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Fraction of pairs with r_c > r_r (a tie counts 1/2); (B,), (B,) -> float."""
    if r_chosen.numel() == 0:
        raise ValueError("preference_accuracy needs at least one pair")
    return _wins(r_chosen, r_rejected).mean().item()


def _wins(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """1 where r_c > r_r, 1/2 on a tie, else 0; (B,), (B,) -> (B,)."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


# ------------------------------------------------------------------- scoring
def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Raw r_phi: the score head at the last non-pad token, position ids from the mask; (B, T) -> (B,).

    ``model`` may be a ``peft.PeftModel`` (a LoRA reward model): its trunk is looked up through it.
    """
    hidden = trunk(model)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    idx = last_token_index(attention_mask)
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), idx]
    weight = getattr(_active_head(model.score), "weight", None)
    if isinstance(weight, torch.Tensor) and torch.is_floating_point(weight):
        last = last.to(weight.dtype)  # a score head held in fp32 on a bf16 trunk
    return model.score(last).squeeze(-1).float()


def encode_replies(
    tokenizer, prompts: Sequence, responses: Sequence[str], terminated=None, max_length: int | None = None,
    eos_ids: Sequence[int | None] | None = None,
) -> list[list[int]]:
    """Token ids of ``format_prompt(prompt, tokenizer) + response (+ EOS if terminated)``, one list per pair.

    A prompt is a string or a list of ``{"role", "content"}`` messages; ``eos_ids`` (optional,
    per pair): the end id to append instead of the tokenizer's EOS
    (:func:`rlhf_book.tokenizer.encode_prompt_response`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    terminated = terminated_flags(terminated, len(prompts))
    if len(terminated) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(terminated)} terminated flags")
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not (isinstance(p, str) or is_messages(p)) or not isinstance(r, str):
            raise ValueError(
                f"pair {i}: prompt (a string or messages) and response (a string) must be strings, "
                f"got {type(p).__name__}, {type(r).__name__}"
            )
    seqs = encode_prompt_response(tokenizer, prompts, responses, terminated, eos_ids)
    if max_length is not None:
        for i, s in enumerate(seqs):
            if len(s) > max_length:
                raise ValueError(
                    f"pair {i}: prompt + response is {len(s)} tokens, "
                    f"longer than the reward model's context of {max_length}"
                )
    return seqs


def _normalization(model) -> tuple[float, float]:
    cfg = model.config
    return float(getattr(cfg, "reward_gain", 1.0)), float(getattr(cfg, "reward_bias", 0.0))


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reward_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    terminated=None,
    batch_size: int = 128,
    normalize: bool = True,
) -> torch.Tensor:
    """r_phi(x, y) per pair, as gain * raw + bias from the config unless ``normalize=False``; -> CPU FloatTensor (B,).

    ``terminated[i]`` False means reply i ended without EOS: it is scored without one.
    """
    seqs = encode_replies(tokenizer, prompts, responses, terminated, _context_size(model))
    was_training = model.training
    model.eval()
    raw = torch.zeros(len(seqs))
    try:
        for idx in _by_length([len(s) for s in seqs], batch_size):
            ids, mask = _collate([seqs[i] for i in idx], tokenizer.pad_token_id)
            raw[idx] = score_sequences(model, ids.to(_device(model)), mask.to(_device(model))).cpu()
    finally:
        model.train(was_training)
    if not normalize:
        return raw
    gain, bias = _normalization(model)
    return gain * raw + bias


def _encode_pairs(tokenizer, records: Sequence[dict], max_length: int | None) -> list[tuple[list[int], list[int]]]:
    """(chosen ids, rejected ids) of each record, as :func:`encode_replies` makes them."""
    prompts = [r["prompt"] for r in records] * 2
    replies = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    terms = [r.get("chosen_terminated", True) for r in records] + [r.get("rejected_terminated", True) for r in records]
    eos = end_token_ids(tokenizer, records, "chosen") + end_token_ids(tokenizer, records, "rejected")
    seqs = encode_replies(tokenizer, prompts, replies, terms, max_length, eos)
    return list(zip(seqs[: len(records)], seqs[len(records) :]))


def _pairs_forward(
    model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (r_chosen, r_rejected), (B,) each: chosen rows and rejected rows in one right-padded batch."""
    ids, mask = _collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    dev = _device(model)
    r = score_sequences(model, ids.to(dev), mask.to(dev))
    return r[: len(pairs)], r[len(pairs) :]


def _by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of indices with similar lengths (less padding); every index once."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_pairs(model, tokenizer, records: Sequence[dict], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scores (r_chosen, r_rejected), each a CPU FloatTensor (B,), of preference records."""
    pairs = _encode_pairs(tokenizer, records, _context_size(model))
    rc, rr = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    was_training = model.training
    model.eval()
    try:
        for idx in _by_length([max(len(c), len(r)) for c, r in pairs], batch_size):
            c, r = _pairs_forward(model, [pairs[i] for i in idx], tokenizer.pad_token_id)
            rc[idx], rr[idx] = c.cpu(), r.cpu()
    finally:
        model.train(was_training)
    return rc, rr


def evaluate_preferences(model, tokenizer, records: Sequence[dict], batch_size: int = 128) -> dict:
    """BT loss, accuracy vs the labels and pairs; gold keys only when every record has gold fields.

    Without gold: ``{"loss", "accuracy", "pairs"}``. With ``chosen_gold`` / ``rejected_gold`` on
    every record, also ``gold_accuracy`` (vs the gold ordering, gold ties left out),
    ``label_gold_agreement`` and ``gold_pairs`` (pairs without a gold tie).
    """
    rc, rr = score_pairs(model, tokenizer, records, batch_size)
    out = {"loss": bradley_terry_loss(rc, rr).item(), "accuracy": preference_accuracy(rc, rr), "pairs": len(records)}
    if records and all("chosen_gold" in r and "rejected_gold" in r for r in records):
        gc = torch.tensor([float(r["chosen_gold"]) for r in records])
        gr = torch.tensor([float(r["rejected_gold"]) for r in records])
        strict = gc != gr
        gold_first = gc > gr  # True where the gold score also prefers 'chosen'
        rm_a = torch.where(gold_first, rc, rr)[strict]  # the RM's score of the gold-better reply
        rm_b = torch.where(gold_first, rr, rc)[strict]
        out["gold_accuracy"] = preference_accuracy(rm_a, rm_b) if bool(strict.any()) else float("nan")
        out["label_gold_agreement"] = gold_first[strict].float().mean().item() if bool(strict.any()) else float("nan")
        out["gold_pairs"] = int(strict.sum())
    return out


def calibration_bins(p_predicted: torch.Tensor, outcome: torch.Tensor, n_bins: int = 10) -> dict:
    """Reliability diagram: per non-empty bin of predicted P, mean prediction, observed frequency, count; (N,), (N,)."""
    if p_predicted.shape != outcome.shape or p_predicted.dim() != 1:
        raise ValueError(
            f"p_predicted and outcome must be 1-D of one shape, got {tuple(p_predicted.shape)}, {tuple(outcome.shape)}"
        )
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = p_predicted.double(), outcome.double()
    which = (p * n_bins).long().clamp(0, n_bins - 1)
    count = torch.bincount(which, minlength=n_bins)
    keep = count > 0
    mean_p = torch.bincount(which, weights=p, minlength=n_bins)[keep] / count[keep]
    freq = torch.bincount(which, weights=y, minlength=n_bins)[keep] / count[keep]
    return {"predicted": mean_p.float(), "observed": freq.float(), "count": count[keep]}


# ------------------------------------------------------------------- model
def reward_model_from_lm(lm):
    """A ``*ForSequenceClassification`` (num_labels=1) with ``lm``'s trunk weights and a zero score head."""
    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.id2label, config.label2id = {0: "reward"}, {"reward": 0}
    config.architectures = None
    if config.pad_token_id is None:
        raise ValueError("the base LM's config has no pad_token_id; load it with rlhf_book.load_base_model")
    rm = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = rm.base_model.load_state_dict(lm.base_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "attn.bias" not in k and "masked_bias" not in k]:
        raise ValueError(f"base LM trunk does not fit the reward model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        rm.score.weight.zero_()
        if getattr(rm.score, "bias", None) is not None:
            rm.score.bias.zero_()
    rm.config.reward_gain, rm.config.reward_bias = 1.0, 0.0
    return rm.to(_device(lm))


@dataclass(frozen=True)
class RewardRecipe:
    """Training recipe of a reward model (Bradley-Terry, AdamW, warmup then linear decay)."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    checkpoint_every: int = 50
    n_reference: int = 1024  # reference-policy replies used to normalise the score
    seed: int = 0


RM_RECIPES: dict[str, RewardRecipe] = {
    "tiny": RewardRecipe(epochs=1, batch_size=16, lr=3e-3, checkpoint_every=2, n_reference=64),
    "cpu": RewardRecipe(epochs=2, batch_size=64, lr=1e-3, checkpoint_every=25, n_reference=512),
    # untested: no GPU was available when this recipe was written
    "gpu": RewardRecipe(epochs=1, batch_size=64, lr=1e-4, checkpoint_every=200, n_reference=4096),
}


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _epoch_batches(pairs, batch_size: int, seed: int, bucket: int = 8) -> list[list[int]]:
    """One epoch's batches: shuffle, sort each run of ``bucket`` batches by length, shuffle the batches.

    Similar lengths in a batch mean less padding (about half the compute here);
    the order depends only on ``seed``, so a resumed run sees the same batches.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(pairs), generator=g).tolist()
    batches = []
    for i in range(0, len(order), batch_size * bucket):
        chunk = order[i : i + batch_size * bucket]
        chunk.sort(key=lambda j: max(len(pairs[j][0]), len(pairs[j][1])))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def train_reward_model(
    model,
    tokenizer,
    train: Sequence[dict],
    validation: Sequence[dict] | None = None,
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_frac: float = 0.05,
    margin: float | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 50,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Minimise the BT loss on ``train``; validate each epoch; checkpoint every N steps and resume.

    If ``checkpoint_path`` exists, training resumes from it (weights, optimizer,
    schedule, step, history, RNG); the last checkpoint is written when training
    finishes, so calling again with the same path only reloads. ``max_steps`` stops early (the schedule still
    spans all epochs), e.g. to simulate an interruption. Returns the history: one row per step
    (see the module docstring), validation keys on the last step of each epoch. The model
    is left in eval mode.
    """
    ctx = _context_size(model)
    train = validate_preferences(train, tokenizer, ctx)
    validation = validate_preferences(validation, tokenizer, ctx) if validation else None
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * per_epoch
    device = _device(model)
    # GPU path: fused AdamW, TF32, bf16 autocast; a CPU keeps the fp32 recipe the cached models were built with
    enable_tf32(device)
    opt = adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, round(warmup_frac * total))))
    history: list[dict] = []
    step = 0
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    state = resume_or_restart(ckpt, model=model, optimizer=opt, scheduler=sched) if ckpt is not None else None
    if state is not None:  # (an unreadable checkpoint is discarded with a warning: training restarts)
        if not isinstance(state["history"], list):
            raise ValueError(f"{ckpt}: written by an older version of the library (another history format); "
                             "delete it to start over")
        step, history = state["step"], state["history"]
        set_rng_state(state["rng"])
    stop = total if max_steps is None else min(total, max_steps)
    pairs = _encode_pairs(tokenizer, train, ctx)
    model.train()
    bar = tqdm(total=total, initial=step, desc="reward model", disable=not progress)
    batches, batches_epoch = None, -1
    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, accuracy]) still on the device: read in one go

    def flush() -> None:
        if pending:
            values = torch.stack([v for _, v in pending]).tolist()
            for (s, _), (loss_v, acc_v) in zip(pending, values):
                history.append({"step": s, "loss": round(loss_v, 5), "accuracy": round(acc_v, 5),
                                "epoch": math.ceil(s / per_epoch)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            pending.clear()

    while step < stop:
        epoch, k = divmod(step, per_epoch)
        if epoch != batches_epoch:
            batches, batches_epoch = _epoch_batches(pairs, batch_size, seed * 1000 + epoch), epoch
        batch = [pairs[i] for i in batches[k]]
        with autocast(device):
            rc, rr = _pairs_forward(model, batch, tokenizer.pad_token_id)
        rc, rr = rc.float(), rr.float()
        loss = bradley_terry_loss(rc, rr, margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            pending.append((step, torch.stack([loss.detach(), _wins(rc, rr).mean()])))
        bar.update(1)
        if step % 25 == 0:
            flush()
        if validation and (step % per_epoch == 0 or step == total):
            flush()
            ev = evaluate_preferences(model, tokenizer, validation)
            model.train()
            history[-1].update(val_loss=round(ev["loss"], 5), val_accuracy=round(ev["accuracy"], 5))
            if "gold_accuracy" in ev:
                history[-1]["val_gold_accuracy"] = round(ev["gold_accuracy"], 5)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", val_acc=f"{ev['accuracy']:.3f}")
        if ckpt is not None and (step % checkpoint_every == 0 or step == total):
            flush()
            save_checkpoint(
                ckpt, model=model, optimizer=opt, scheduler=sched, step=step, history=history, rng=rng_state()
            )
    flush()
    bar.close()
    model.eval()
    return history


# ------------------------------------------------------------------- normalisation and reward function
def normalize_reward_model(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], terminated=None) -> dict:
    """Set config gain/bias so that scores of these (reference-policy) replies have mean 0, std 1; returns them."""
    raw = reward_scores(model, tokenizer, prompts, responses, terminated, normalize=False)
    if raw.numel() < 2:
        raise ValueError("normalisation needs at least two reference replies")
    mean, std = raw.mean().item(), raw.std().item()
    if not math.isfinite(std) or std < 1e-8:
        raise ValueError(f"reference scores have std {std}: the reward model gives every reply the same score")
    model.config.reward_gain, model.config.reward_bias = 1.0 / std, -mean / std
    return {
        "raw_mean": mean,
        "raw_std": std,
        "gain": model.config.reward_gain,
        "bias": model.config.reward_bias,
        "n": raw.numel(),
    }


class ModelReward:
    """A reward model as a reward function: ``(prompts, responses, terminated=None) -> FloatTensor (B,)`` (CPU).

    What :func:`reward_fn_from_model` returns. It re-tokenizes the text (the reward
    function's signature is text, so any scorer can stand in for it) and scores it with
    :func:`reward_scores`. ``to(device)`` moves the model: the RL trainers call it, so a
    reward model given on another device runs on the policy's.
    """

    def __init__(self, model, tokenizer, normalize: bool = True, batch_size: int = 128):
        self.model, self.tokenizer, self.normalize, self.batch_size = model, tokenizer, normalize, batch_size

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], terminated=None) -> torch.Tensor:
        term = None if terminated is None else torch.as_tensor(terminated, dtype=torch.bool).cpu()
        return reward_scores(self.model, self.tokenizer, prompts, responses, term, self.batch_size, self.normalize)

    def to(self, device) -> "ModelReward":
        """Move the reward model to ``device``; returns self."""
        self.model.to(device)
        return self


def reward_fn_from_model(model, tokenizer, normalize: bool = True, batch_size: int = 128) -> ModelReward:
    """Wrap a reward model as ``reward_fn(prompts, responses, terminated=None) -> FloatTensor (B,)`` (CPU).

    Scores are normalised (mean 0 / std 1 on reference-policy replies) unless
    ``normalize=False``. A reply with ``terminated`` False is scored by the model without
    an EOS token; a fixed score for such replies instead (the "EOS trick") is
    :func:`rlhf_book.rewards.apply_missing_eos_score`, which the RL trainers apply from their
    ``missing_eos_score`` setting.
    """
    return ModelReward(model, tokenizer, normalize, batch_size)


# ------------------------------------------------------------------- build and cache
def _reference_replies(lm, tokenizer, prompts: Sequence[str], n: int, max_new_tokens: int, seed: int):
    """``n`` replies of ``lm`` (temperature 1) to ``prompts``, cycled: (prompts, replies, terminated)."""
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    gen = torch.Generator(device=_device(lm)).manual_seed(seed)
    texts, terms = [], []
    for i in range(0, n, 256):
        roll = generate(lm, tokenizer, prompts[i : i + 256], max_new_tokens=max_new_tokens, generator=gen)
        texts += roll.responses
        terms += roll.terminated.tolist()
    return prompts, texts, terms


def build_reward_model(base: str, workdir: str | Path, device=None, progress: bool = True, prompts=None,
                       member: dict | None = None) -> dict:
    """Preferences (cached) -> BT training (checkpointed, resumable) -> normalisation -> save_pretrained(workdir).

    ``prompts`` (strings or ``{"prompt": ...}`` records; None: the book's RL train prompts):
    the prompts of the preference data (:func:`rlhf_book.preferences.load_preference_data`)
    and of the reference replies the score is normalised on. ``member`` (an ensemble member,
    ``{"seed", "data_fraction", "head_init_std"}``, see :func:`load_reward_ensemble`; None: the
    book's reward model) replaces the recipe's seed, trains on that share of the pairs and
    starts the score head at that std; the reference replies are the same for every member.
    """
    workdir = Path(workdir)
    recipe = RM_RECIPES[base]
    member = _member(recipe, member)
    device = torch.device(device) if device is not None else get_device()
    data = load_preference_data(base, progress=progress, prompts=prompts)
    lm, tokenizer = load_base_model(base, device=device, progress=progress)
    set_seed(member["seed"])
    rm = init_score_head(reward_model_from_lm(lm), member["head_init_std"], member["seed"])
    train = ensemble_member_records(data["train"], member["seed"], member["data_fraction"],
                                    member.get("label_noise", 0.0))
    t0 = time.time()
    history = train_reward_model(
        rm,
        tokenizer,
        train,
        data["validation"],
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_frac=recipe.warmup_frac,
        checkpoint_path=workdir / "train_state.pt",
        checkpoint_every=recipe.checkpoint_every,
        seed=member["seed"],
        progress=progress,
    )
    train_seconds = time.time() - t0
    ref_prompts = [p["prompt"] for p in prompt_split(0)[0]] if prompts is None else prompt_texts(prompts)
    norm = normalize_reward_model(
        rm, tokenizer, *_reference_replies(lm, tokenizer, ref_prompts, recipe.n_reference,
                                           PREFERENCE_RECIPES[base].max_new_tokens, recipe.seed + 1)
    )
    test = evaluate_preferences(rm, tokenizer, data["test"])
    on_whose = "" if prompts is None else " on a reader's prompts"
    save_model(
        rm, tokenizer, workdir, title=f"rlhf_book reward model, base preset {base!r}", padding_side="right",
        loader="AutoModelForSequenceClassification",
        description=(
            "A Bradley-Terry reward model: the base LM's trunk with a scalar score head, trained on the book's "
            f"simulated preference pairs{on_whose}.\n\n"
            "- `logits[:, 0]` is the raw score, read at the last non-pad token; pad on the right (the saved "
            "tokenizer does), since a plain GPT-2 forward does not shift positions for left padding.\n"
            f"- normalised score = `config.reward_gain * raw + config.reward_bias` (gain {norm['gain']:.6g}, "
            f"bias {norm['bias']:.6g}): mean 0, std 1 on replies of the base LM. `rlhf_book.reward_scores` "
            "applies it."
        ),
    )
    meta = {
        "base": base,
        "recipe": asdict(recipe),
        "rm_version": RM_VERSION,
        "world_version": WORLD_VERSION,
        "train_pairs": len(train),
        **({} if _is_book_member(recipe, member) else {"member": member}),
        "train_seconds": round(train_seconds, 1),
        "normalization": norm,
        "test": test,
        "history": history,
        "device": str(device),
    }
    (workdir / "metadata.json").write_text(json.dumps(meta))
    ckpt = workdir / "train_state.pt"
    if ckpt.exists():
        ckpt.unlink()
    return {k: v for k, v in meta.items() if k != "history"}


def artifact_name(base: str, prompts=None, member: dict | None = None) -> str:
    """Cache key of a reward model: recipe, version, the keys of its preference data (prompts included) and base LM.

    An ensemble ``member`` that differs from the book's reward model (see :func:`load_reward_ensemble`)
    adds its settings to the recipe, so each member has its own key; one equal to it has the book's key.
    """
    recipe = RM_RECIPES[base]
    member = _member(recipe, member)
    extra = {} if _is_book_member(recipe, member) else {"member": member}
    return artifact_key(
        "rm", base, {"recipe": asdict(recipe), "rm_version": RM_VERSION, "format": SAVE_FORMAT, **extra},
        upstream=[preference_data_key(base, prompts), base_artifact_name(base, PRESETS[base])],
    )


def reward_model_path(base: str = "cpu", prompts=None, member: dict | None = None) -> Path:
    """Where the cached reward model for base preset ``base`` (and ``prompts``) lives (it may not be built yet)."""
    return cache_dir() / artifact_name(base, prompts, member)


def _cached_reward_model(base: str, device, progress: bool, prompts, member: dict | None = None) -> Path:
    """The cached reward model's directory for preset ``base`` and ``prompts``, built first if needed."""
    if base not in RM_RECIPES:
        raise ValueError(f"unknown reward model preset {base!r}; choose one of {', '.join(RM_RECIPES)}")
    if prompts is not None:
        split_prompts(prompts, PREFERENCE_RECIPES[base].prompt_fractions)  # bad prompts fail before anything slow

    def build(workdir: Path) -> dict:
        return build_reward_model(base, workdir, device, progress, prompts, member)

    return cached_artifact(artifact_name(base, prompts, member), build)


# ------------------------------------------------------------------- ensembles
def _member(recipe: RewardRecipe, member: dict | None) -> dict:
    """An ensemble member's settings ``{"seed", "data_fraction", "head_init_std", "label_noise"}``, checked; None: the recipe's."""
    out = {"seed": recipe.seed, "data_fraction": 1.0, "head_init_std": 0.0, "label_noise": 0.0}
    member = member or {}
    unknown = set(member) - set(out)
    if unknown:
        raise ValueError(f"member: unknown keys {sorted(unknown)}; it takes {sorted(out)}")
    out.update(member)
    _check_member(out["seed"], out["data_fraction"], out["head_init_std"], out["label_noise"])
    member = {"seed": int(out["seed"]), "data_fraction": float(out["data_fraction"]),
              "head_init_std": float(out["head_init_std"])}
    if out["label_noise"]:  # absent when 0: the keys (and caches) of noise-free members stay as they were
        member["label_noise"] = float(out["label_noise"])
    return member


def _check_member(seed, data_fraction, head_init_std, label_noise=0.0) -> None:
    """ValueError naming the setting unless seed is an int, data_fraction in (0, 1], head_init_std finite >= 0,
    label_noise in [0, 1)."""
    if not (_is_number(seed) and isinstance(seed, int)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not (_is_number(data_fraction) and 0 < data_fraction <= 1):
        raise ValueError(f"data_fraction must be a number in (0, 1], got {data_fraction!r}")
    if not (_is_number(head_init_std) and math.isfinite(head_init_std) and head_init_std >= 0):
        raise ValueError(f"head_init_std must be a finite number >= 0, got {head_init_std!r}")
    if not (_is_number(label_noise) and 0 <= label_noise < 1):
        raise ValueError(f"label_noise (the share of flipped labels) must be a number in [0, 1), got {label_noise!r}")


def _is_book_member(recipe: RewardRecipe, member: dict) -> bool:
    return member == {"seed": recipe.seed, "data_fraction": 1.0, "head_init_std": 0.0}


LABEL_NOISE_SEED = 7_654_321  # one noisy labelling for every member: the raters are noisy, not each model's data


def flip_labels(records: Sequence[dict], share: float, seed: int = LABEL_NOISE_SEED) -> list[dict]:
    """Each pair's label flipped with probability ``share`` (chosen_* and rejected_* fields swapped): label noise."""
    _check_member(0, 1.0, 0.0, share)
    rng = random.Random(seed)
    out = []
    for r in records:
        if rng.random() < share:
            r = {**r, **{f"chosen{k[8:]}": v for k, v in r.items() if k.startswith("rejected")},
                 **{f"rejected{k[6:]}": v for k, v in r.items() if k.startswith("chosen")}}
        out.append(r)
    return out


def ensemble_member_records(records: Sequence[dict], seed: int, data_fraction: float = 1.0,
                            label_noise: float = 0.0) -> list[dict]:
    """The pairs member ``seed`` trains on: all, or a random round(data_fraction * N) of them without replacement,
    after :func:`flip_labels` with ``label_noise`` (the same flips for every member)."""
    _check_member(seed, data_fraction, 0.0, label_noise)
    records = flip_labels(records, label_noise) if label_noise else list(records)
    if data_fraction == 1:
        return records
    m = max(1, round(data_fraction * len(records)))
    keep = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:m].sort().values
    return [records[i] for i in keep.tolist()]


def init_score_head(model, std: float = 0.0, seed: int = 0):
    """Score head weights ~ N(0, std^2), generator seeded with ``seed`` (std 0: zero, the library's start); -> model."""
    _check_member(seed, 1.0, std)
    with torch.no_grad():
        w = model.score.weight
        if std == 0:
            w.zero_()
        else:
            g = torch.Generator().manual_seed(seed)
            w.copy_(torch.randn(w.shape, generator=g) * std)
        if getattr(model.score, "bias", None) is not None:
            model.score.bias.zero_()
    return model


def train_reward_ensemble(
    lm,
    tokenizer,
    train: Sequence[dict],
    validation: Sequence[dict] | None = None,
    k: int = 4,
    *,
    seeds: Sequence[int] | None = None,
    data_fraction: float = 1.0,
    head_init_std: float = 0.0,
    label_noise: float = 0.0,
    reference: tuple | None = None,
    **train_kwargs,
) -> tuple[list, list[list[dict]]]:
    """k reward models on ``lm``'s trunk, member i with seed ``seeds[i]`` (default i); -> (models, histories).

    A member's seed sets its batch order (:func:`train_reward_model`'s ``seed``), its score-head
    start (:func:`init_score_head`; zero unless ``head_init_std`` > 0) and, with
    ``data_fraction`` < 1, its random subset of ``train`` (:func:`ensemble_member_records`);
    ``label_noise``: that share of the labels flipped, the same pairs for every member (:func:`flip_labels`).
    ``reference``: ``(prompts, responses, terminated)`` of reference-policy replies; when given,
    every member is normalised on them (:func:`normalize_reward_model`), which puts the members
    on one scale for :func:`rlhf_book.overoptimization.ensemble_reward_fn`. ``train_kwargs`` go to
    :func:`train_reward_model` (epochs, batch_size, lr, ...; not ``seed``).
    """
    seeds = list(range(k)) if seeds is None else list(seeds)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or len(seeds) != k:
        raise ValueError(f"k must be an integer >= 1 and seeds (if given) k integers; got k={k!r}, seeds={seeds!r}")
    if len(set(seeds)) != k:
        raise ValueError(f"seeds must differ, got {seeds}: members with one seed and one subset are the same model")
    if "seed" in train_kwargs:
        raise ValueError("pass the members' seeds as seeds=[...], not seed=")
    for s in seeds:
        _check_member(s, data_fraction, head_init_std, label_noise)
    models, histories = [], []
    for s in seeds:
        set_seed(s)
        rm = init_score_head(reward_model_from_lm(lm), head_init_std, s)
        rows = ensemble_member_records(train, s, data_fraction, label_noise)
        histories.append(train_reward_model(rm, tokenizer, rows, validation, seed=s, **train_kwargs))
        if reference is not None:
            normalize_reward_model(rm, tokenizer, *reference)
        models.append(rm)
    return models, histories


def load_reward_ensemble(
    base: str = "cpu",
    k: int = 4,
    *,
    data_fraction: float = 1.0,
    head_init_std: float = 0.0,
    label_noise: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = True,
    prompts=None,
) -> tuple[list, object]:
    """``([rm_0, ..., rm_{k-1}], tokenizer)``: the book's pipeline k times, member i with seed recipe.seed + i.

    Each member is built by :func:`build_reward_model` with ``member={"seed": recipe.seed + i,
    "data_fraction": ..., "head_init_std": ...}`` and cached under its own :func:`artifact_name`;
    all share the cached base LM and preference data and are normalised (mean 0, std 1) on the
    same reference replies. With the defaults (all pairs, zero head start) member 0 *is* the book's
    reward model (same key, no rebuild) and the members differ only in batch order; a
    ``data_fraction`` < 1 or a ``head_init_std`` > 0 makes them differ more. ``label_noise``: every
    member trains on the same pairs with that share of their labels flipped (:func:`flip_labels`:
    noisy raters), validated on the clean labels.
    """
    if base not in RM_RECIPES:
        raise ValueError(f"unknown reward model preset {base!r}; choose one of {', '.join(RM_RECIPES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    device = torch.device(device) if device is not None else get_device()
    seed0 = RM_RECIPES[base].seed
    members = [{"seed": seed0 + i, "data_fraction": data_fraction, "head_init_std": head_init_std,
                "label_noise": label_noise} for i in range(k)]
    for m in members:
        _member(RM_RECIPES[base], m)  # bad settings fail before anything slow
    models, tokenizer = [], None
    for m in members:
        path = _cached_reward_model(base, device, progress, prompts, m)
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        models.append(AutoModelForSequenceClassification.from_pretrained(path).to(device).eval())
    return models, tokenizer


def load_reward_model(base: str = "cpu", device: torch.device | str | None = None, progress: bool = True, prompts=None,
                      dtype="auto"):
    """Return ``(reward_model, tokenizer)`` in eval mode; the model's config holds the score normalisation.

    The config fields ``reward_gain`` and ``reward_bias`` are the normalisation
    ``gain * raw + bias`` (:func:`normalize_reward_model`): a plain HF forward gives the raw
    score, the library's :func:`reward_scores` the normalised one. The tokenizer pads on
    the right (see the module docstring); the library's scoring does not depend on it.

    ``base``: a base preset (``"tiny"``, ``"cpu"``, ``"gpu"``): the reward model trained on that
    base LM's preference data, built and cached on first use (preference data
    included); or a directory saved with ``save_pretrained``.
    ``prompts`` (with a preset; strings or ``{"prompt": ...}`` records): build the preset's
    pipeline on these prompts instead of the book's (cached under its own key).
    ``dtype``: "auto" (the checkpoint's own dtype; the presets are fp32), "float32"/"fp32",
    "bfloat16"/"bf16", "float16" or a ``torch.dtype`` (the policy: :mod:`rlhf_book.runtime`).
    Save a reward model of one's own with :func:`save_reward_model`.
    Stable API: later chapters call ``load_reward_model("cpu")`` and
    :func:`reward_fn_from_model`.
    """
    device = torch.device(device) if device is not None else get_device()
    resolve_dtype(dtype)  # a bad dtype fails before anything slow
    if base in RM_RECIPES:
        path = _cached_reward_model(base, device, progress, prompts)
    elif prompts is not None:
        raise ValueError(f"prompts applies only to a preset ({', '.join(RM_RECIPES)}), not to the saved model {base!r}")
    elif os.path.isdir(str(base)):
        path = Path(base)
    else:
        raise ValueError(f"unknown reward model {base!r}: not a preset ({', '.join(RM_RECIPES)}) nor a saved directory")
    archs = getattr(_saved_config(path), "architectures", None) or []
    if any(a.endswith(("LMHeadModel", "ForCausalLM")) for a in archs):
        raise ValueError(f"{path} holds a causal LM ({archs[0]}), not a reward model: load it with load_base_model, "
                         "or make a reward model from it with reward_model_from_lm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, **dtype_kwargs(dtype))
    except Exception as e:  # a truncated model.safetensors raises safetensors' own error type
        advice = ("Delete that folder to rebuild it." if base in RM_RECIPES
                  else "A file there is missing, cut off or not a model file: save the model again.")
        raise ValueError(f"cannot load the reward model in {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}. {advice}") from None
    if model.config.num_labels != 1:
        raise ValueError(f"{path} holds a classifier with {model.config.num_labels} labels, not a reward model (1)")
    return model.to(device).eval(), tokenizer


def save_reward_model(model, tokenizer, directory: str | Path, description: str = "") -> Path:
    """Save a reward model of one's own so that :func:`load_reward_model` and plain transformers load it; returns the
    directory.

    ``model``: a ``*ForSequenceClassification`` with one label (e.g. from :func:`reward_model_from_lm`
    and :func:`train_reward_model`), or a ``peft.PeftModel`` around one (its adapters are merged
    into a copy: the saved model needs no peft). The tokenizer is saved padding on the right
    (see the module docstring); ``tokenizer`` itself is left as it was.
    """
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if n != 1:
        raise ValueError(f"save_reward_model needs a sequence classifier with num_labels=1, got {type(model).__name__} "
                         f"(num_labels={n})")
    gain, bias = _normalization(model)
    text = description.strip() or (f"A reward model r(x, y) saved with rlhf_book; the normalised score is "
                                   f"{gain:g} * logits[:, 0] + {bias:g} (config reward_gain, reward_bias).")
    return save_model(model, tokenizer, directory, title="rlhf_book reward model", description=text,
                      padding_side="right", loader="AutoModelForSequenceClassification")


def _saved_config(path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a saved model directory ({e})") from None


def reward_model_info(base: str = "cpu", progress: bool = True, prompts=None) -> dict:
    """Metadata of the cached reward model (recipe, training history, normalisation, test metrics); builds if needed."""
    return json.loads((_cached_reward_model(base, None, progress, prompts) / "metadata.json").read_text())
