"""LoRA and other PEFT adapters (the ``peft`` package, optional: ``pip install rlhf-book[peft]``).

A ``peft.PeftModel`` policy works in every trainer: only its adapter weights are trained (the
optimizer sees the parameters that require grad), sampling and the teacher-forced forwards
look through the wrapper to the transformers model inside (:func:`hf_model`), critics and
reward models read the real trunk (:func:`trunk`), and an export writes the merged model
(:func:`merged_copy`), which plain ``AutoModelForCausalLM.from_pretrained`` loads.

The reference of a PEFT policy needs no second copy of the weights: with ``ref_model=None``
the trainers use :class:`AdapterDisabledReference`, the policy itself with its adapters
switched off (as TRL does). peft is imported only when a PEFT model is actually given.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

__all__ = ["is_peft_model", "hf_model", "trunk", "AdapterDisabledReference", "merged_copy"]


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False without importing peft when it is not loaded)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def hf_model(model):
    """The transformers model whose forward does the work: inside a DDP wrapper, a
    :class:`~rlhf_book.critic.PolicyWithValueHead` (its ``lm``) and a ``PeftModel`` (its base model,
    with the adapter layers injected); else ``model``. Used to read a forward's signature."""
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(4):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif is_peft_model(model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "lm", None), nn.Module):
            model = model.lm
        else:
            break
    return model


def trunk(model) -> nn.Module:
    """The transformer trunk (no LM or score head) of a transformers model or of a ``PeftModel`` around one.

    ``model.base_model`` is the trunk of a transformers model, but a ``PeftModel``'s
    ``base_model`` is the whole adapted model (a ``LoraModel``, heads included): this looks through it.
    """
    inner = model.get_base_model() if is_peft_model(model) else model
    return inner.base_model


class AdapterDisabledReference(nn.Module):
    """pi_ref of a PEFT policy: the policy's own forward with its adapters disabled; no copy of the weights.

    The policy is held outside this module's tree, so what a trainer does to its reference
    (``.to(device)``, ``.eval()``, ``.requires_grad_(False)``, ``disable_dropout``) does not
    touch the policy: its LoRA weights stay trainable and its dropout as configured. The
    forward runs without gradient and with the policy in eval mode unless this module is in
    training mode (its own mode, restored after). As long as the adapter's output starts at 0
    (LoRA's B = 0), the reference equals the initial policy exactly.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not is_peft_model(policy):
            raise ValueError(f"AdapterDisabledReference needs a peft.PeftModel policy, got {type(policy).__name__}")
        object.__setattr__(self, "_policy", policy)  # not a submodule
        # a parameter-less module has no device: this empty one follows .to() and answers next(parameters())
        anchor = next(policy.parameters())
        self._anchor = nn.Parameter(torch.zeros(0, device=anchor.device), requires_grad=False)

    @property
    def policy(self) -> nn.Module:
        return self._policy

    @property
    def config(self):
        return self._policy.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep: int = 0, **kwargs):
        from .rollout import logits_to_keep_kwargs

        policy = self._policy
        modes = [m.training for m in policy.modules()]
        if not self.training:
            policy.eval()
        try:
            with torch.no_grad(), policy.disable_adapter():
                return policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **logits_to_keep_kwargs(policy, logits_to_keep), **kwargs)
        finally:
            for m, mode in zip(policy.modules(), modes):
                m.training = mode


def merged_copy(model) -> nn.Module:
    """A ``PeftModel``'s adapters merged into a deep copy of its base weights (the live model is not changed):
    a plain transformers model that saves and loads without peft. Any other model is returned as is."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
