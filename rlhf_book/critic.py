"""The critic: a value function V(s_t) over the states of a response, in two architectures.

* :class:`PolicyWithValueHead`: the policy LM plus a linear value head on its last
  hidden state. One forward gives logits *and* values (cheap). With
  ``detach_value_head=True`` the value loss cannot move the shared trunk, which
  keeps a small policy stable (the value loss is otherwise free to rewrite the
  features the policy relies on).
* :class:`ValueModel`: a separate trunk plus a scalar head. It costs a second
  forward pass but the actor and the critic cannot disturb each other. It can
  start from the base LM's trunk or from a reward model's trunk and score head
  (the reward model already knows what a good response looks like).

Both read states the same way: the hidden state at column P - 1 + t (the last
prompt token, then each response token) summarises s_t, the state *before*
response token t, the same off-by-one as :func:`rlhf_book.rollout.response_logprobs`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import trunk as _trunk
from .advantage import masked_var
from .rollout import (Rollout, _last_hidden, cache_kwarg, logits_to_keep_kwargs, output_cache, position_ids_from_mask,
                      teacher_forced, unwrap)

__all__ = [
    "ValueHead",
    "PolicyWithValueHead",
    "PolicyValueOutput",
    "ValueModel",
    "response_values",
    "build_critic",
    "forward_logprobs_and_values",
    "explained_variance",
]


class ValueHead(nn.Module):
    """Linear map hidden state -> scalar V(s_t); (B, T, H) -> (B, T). Starts at 0 (V = 0 everywhere).

    ``dtype``: of its weights (default fp32). The hidden states are cast to it, so a head
    reads a bf16 trunk whatever its own dtype (the trainers hold it in fp32, see
    :mod:`rlhf_book.runtime`).
    """

    def __init__(self, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=dtype)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a model's weights (its input embeddings', else its first floating parameter's)."""
    emb = getattr(module, "get_input_embeddings", None)
    weight = getattr(emb(), "weight", None) if callable(emb) else None
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _active_head(module):
    """The trained copy inside peft's ``ModulesToSaveWrapper`` (a LoRA reward model's score head), else ``module``."""
    copies = getattr(module, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and len(copies):
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        return copies[active] if active in copies else next(iter(copies.values()))
    return module


def _critic_dtype(dtype, like: nn.Module) -> torch.dtype:
    """``dtype`` of a critic's constructor: "auto" -> the dtype of ``like``'s weights, else :func:`resolve_dtype`'s."""
    from .runtime import resolve_dtype

    dtype = resolve_dtype(dtype)
    return _module_dtype(like) if dtype == "auto" else dtype


def _hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size in config {type(config).__name__}")


@dataclass
class PolicyValueOutput:
    """What :class:`PolicyWithValueHead` returns: logits (B, T, V), values (B, T), the KV cache (for generation).

    The cache sits under both names transformers has used for it (``cache`` from 5.24, ``past_key_values`` before).
    """

    logits: torch.Tensor
    values: torch.Tensor
    cache: Any = None

    @property
    def past_key_values(self):
        return self.cache


class PolicyWithValueHead(nn.Module):
    """A causal LM (the actor) with a value head (the critic) on its trunk's last hidden state.

    ``forward`` returns :class:`PolicyValueOutput`; it takes the same arguments as the
    LM, so :func:`rlhf_book.rollout.generate` and ``response_logprobs`` accept this
    module in place of the bare LM. ``lm`` may be a ``peft.PeftModel``. ``dtype`` of the
    value head: "auto" (the LM's weights'), a name or a ``torch.dtype``
    (:func:`rlhf_book.runtime.resolve_dtype`); a trainer then holds it as its dtype policy says.
    """

    def __init__(self, lm: nn.Module, detach_value_head: bool = True, dtype="auto"):
        super().__init__()
        self.lm = lm
        self.value_head = ValueHead(_hidden_size(lm.config), dtype=_critic_dtype(dtype, lm))
        self.detach_value_head = detach_value_head
        self._cache_name = cache_kwarg(lm)  # looked up once: forward may run under torch.compile

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs) -> PolicyValueOutput:
        """Logits and V of every column; position ids default to those derived from ``attention_mask``.

        ``logits_to_keep`` > 0: logits of the last that many columns only (V still covers every column).
        """
        if position_ids is None and attention_mask is not None:
            position_ids = position_ids_from_mask(attention_mask)
        kept = []  # the trunk's last hidden state, kept by a hook: no output_hidden_states (every layer's)
        handle = _trunk(self.lm).register_forward_hook(lambda module, args, output: kept.append(_last_hidden(output)))
        try:
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **logits_to_keep_kwargs(self.lm, logits_to_keep),
                **kwargs,
            )
        finally:
            handle.remove()
        hidden = kept[-1]
        values = self.value_head(hidden.detach() if self.detach_value_head else hidden)
        return PolicyValueOutput(logits=out.logits, values=values, cache=output_cache(out, self._cache_name))

    def value(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """V of every column, (B, T) -> (B, T) (the LM head runs on one column only: its logits are not needed)."""
        return self(input_ids, attention_mask, logits_to_keep=1).values


class ValueModel(nn.Module):
    """A stand-alone critic: a transformer trunk (no LM head) and a scalar value head.

    ``dtype`` (also of the ``from_*`` constructors): "auto" keeps the trunk's dtype (a new head
    takes it too); a name or ``torch.dtype`` casts trunk and head to it. The trainers then hold
    the trainable parameters as :mod:`rlhf_book.runtime`'s dtype policy says.
    """

    def __init__(self, trunk: nn.Module, head: ValueHead | None = None, dtype="auto"):
        super().__init__()
        from .runtime import resolve_dtype

        cast = resolve_dtype(dtype) != "auto"  # "auto": the trunk as it is (a LoRA trunk mixes dtypes)
        dtype = _critic_dtype(dtype, trunk)
        self.trunk = trunk.to(dtype) if cast else trunk
        self.value_head = (head if head is not None else ValueHead(_hidden_size(trunk.config))).to(dtype)

    @property
    def config(self):
        return self.trunk.config

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, dtype="auto") -> "ValueModel":
        """A copy of the LM's trunk (``lm.base_model``) with a fresh value head (V = 0 at the start).

        Of a ``peft.PeftModel``: a copy of its base model's trunk with the adapter layers in it,
        so the critic trains its own copy of the adapters (and its head) on frozen base weights.
        """
        return cls(copy.deepcopy(_trunk(lm)), dtype=dtype)

    @classmethod
    def from_reward_model(cls, rm: nn.Module, dtype="auto") -> "ValueModel":
        """A copy of a sequence-classification reward model's trunk; the head starts as its score head.

        So at the start V(s_t) is the reward model's score of the prefix so far, including the
        normalisation ``gain * raw + bias`` stored in its config (``reward_gain``, ``reward_bias``)
        by :func:`rlhf_book.reward_model.normalize_reward_model`.
        """
        trunk = copy.deepcopy(_trunk(rm))
        head = ValueHead(_hidden_size(trunk.config))
        score = getattr(rm, "score", None)
        if score is None:
            score = getattr(rm, "classifier", None)
        score = _active_head(score)
        weight = getattr(score, "weight", None)
        if weight is None or weight.shape != head.linear.weight.shape:
            raise ValueError(
                f"reward model {type(rm).__name__} has no scalar score head of shape {tuple(head.linear.weight.shape)}"
            )
        gain = float(getattr(rm.config, "reward_gain", 1.0) or 1.0)
        offset = float(getattr(rm.config, "reward_bias", 0.0) or 0.0)
        with torch.no_grad():  # fold the reward model's score normalisation (gain * raw + bias) into the head
            head.linear.weight.copy_(gain * weight)
            bias = getattr(score, "bias", None)
            head.linear.bias.fill_(offset)
            if bias is not None:
                head.linear.bias.add_(gain * bias)
        return cls(trunk, head, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids=None) -> torch.Tensor:
        """V of every column, (B, T) -> (B, T); position ids default to those derived from the mask."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.value_head(hidden)

    def value(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """V of every column, (B, T) -> (B, T)."""
        return self(input_ids, attention_mask)


def build_critic(kind: str, policy: nn.Module | None = None, reward_model: nn.Module | None = None) -> nn.Module | None:
    """The critic module for ``kind``: "head" (None: the trainer puts a value head on the policy), "separate"
    (a ValueModel copy of the policy's trunk) or "reward_model" (a ValueModel from the reward model)."""
    if kind == "head":
        return None
    if kind == "reward_model":
        if reward_model is None:
            raise ValueError("critic='reward_model' needs the reward model")
        return ValueModel.from_reward_model(reward_model)
    if kind == "separate":
        if policy is None:
            raise ValueError("critic='separate' needs the policy LM")
        return ValueModel.from_causal_lm(policy)
    raise ValueError(f"unknown critic kind {kind!r}; choose 'head', 'separate' or 'reward_model'")


def response_values(critic: nn.Module, rollout: Rollout) -> torch.Tensor:
    """V(s_t) for the state before each response token (0-based token t: column P - 1 + t), (B, R); 0 where response_mask is 0.

    ``critic``: a :class:`ValueModel` or a :class:`PolicyWithValueHead` (anything with ``value(ids, mask)``),
    or a DDP wrapper of one (called through its forward, so that gradients are synchronised).
    """
    inner = unwrap(critic)
    if not hasattr(inner, "value"):
        raise ValueError(f"critic must be a PolicyWithValueHead or a ValueModel, got {type(inner).__name__}")
    P = rollout.prompt_ids.size(1)
    if inner is critic:
        v = critic.value(rollout.input_ids, rollout.attention_mask)
    elif isinstance(inner, PolicyWithValueHead):
        v = critic(rollout.input_ids, rollout.attention_mask, logits_to_keep=1).values
    else:
        v = critic(rollout.input_ids, rollout.attention_mask)
    v = v[:, P - 1 : -1]
    return torch.where(rollout.response_mask.bool(), v, torch.zeros((), dtype=v.dtype, device=v.device))


def forward_logprobs_and_values(
    model: nn.Module, rollout: Rollout, temperature: float = 1.0, entropy_grad: bool = True,
    chunk_size: int | None = None, with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One teacher-forced forward -> (log pi(a_t | s_t), V(s_t), entropy H(pi(. | s_t))), each (B, R), masked 0.

    ``model`` is a :class:`PolicyWithValueHead` (values from the same forward) or a
    bare causal LM (then values is None; get them from a separate critic with
    :func:`response_values`). Log-probs and entropy use softmax(logits / temperature).
    ``entropy_grad=False`` computes the entropy outside the graph, for when it is only
    logged (no entropy bonus): its backward through a (B, R, V) softmax is then skipped;
    ``with_entropy=False`` skips it (entropy is None). ``chunk_size``: rows per LM-head chunk
    (:func:`rlhf_book.rollout.teacher_forced`; None: automatic, the whole batch for the book's model).
    """
    P = rollout.prompt_ids.size(1)
    entropy = ("grad" if entropy_grad else "no_grad") if with_entropy else None
    logprobs, entropy, out = teacher_forced(model, rollout, temperature, chunk_size, entropy)
    values = getattr(out, "values", None)
    if isinstance(values, torch.Tensor):
        zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
        values = torch.where(rollout.response_mask.bool(), values[:, P - 1 : -1], zero)
    else:
        values = None
    return logprobs, values, entropy


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - V] / Var[returns] over valid tokens: 1 perfect, 0 no better than a constant, < 0 worse."""
    var_r = masked_var(returns, mask)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)
