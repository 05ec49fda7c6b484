"""Saving models so that plain transformers (and TRL) load them exactly as the library does.

One function, :func:`save_model`, writes a model directory: the weights and config
(``save_pretrained``), the tokenizer with its padding side and context length
(:func:`rlhf_book.tokenizer.save_tokenizer`) and a short model card (``README.md``)
saying what the model is and how to load it. The base LM, the reward model and a
trained policy are all written this way.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .adapters import is_peft_model, merged_copy
from .rollout import _context_size
from .tokenizer import format_prompt, save_tokenizer

__all__ = ["save_model"]


def save_model(model, tokenizer, directory: str | Path, title: str, description: str, padding_side: str = "left",
               loader: str = "AutoModelForCausalLM", save_adapter: bool = False) -> Path:
    """``save_pretrained`` model + tokenizer into ``directory`` and write a model card; returns the directory.

    ``padding_side``: what ``AutoTokenizer`` will use. Causal LMs get "left" (generation
    continues the prompt at the right edge, and ``generate`` derives positions from the
    mask); a GPT-2 reward model gets "right", the side on which a plain HF forward, whose
    position ids ignore padding, scores exactly what the library scores.

    A ``peft.PeftModel`` (LoRA) is saved merged: its adapters are merged into a copy of the
    base weights (the live model is not changed), so plain ``from_pretrained`` loads it with
    the same logits and without peft. ``save_adapter=True`` also writes the adapter alone into
    ``directory/adapter`` (``PeftModel.from_pretrained(base, directory / "adapter")`` on the base
    model as :func:`rlhf_book.load_base_model` returns it, PAD row included).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    peft = is_peft_model(model)
    if save_adapter and not peft:
        raise ValueError(f"save_adapter=True needs a peft.PeftModel, got {type(model).__name__}")
    merged = merged_copy(model)
    merged.save_pretrained(directory)
    if save_adapter:
        with warnings.catch_warnings():  # peft keeps the embeddings when the vocabulary grew (the PAD row): wanted
            warnings.filterwarnings("ignore", message="Setting `save_embedding_layers`")
            model.save_pretrained(directory / "adapter")
    if peft:
        description = description.strip() + " Its LoRA adapters are merged into the weights (no peft needed)."
    del merged
    ctx = _context_size(model)
    save_tokenizer(tokenizer, directory, ctx, padding_side)
    card = [
        f"# {title}", "", description.strip(), "",
        "## Loading it", "", "```python",
        f"from transformers import AutoTokenizer, {loader}",
        'path = "path/to/this/folder"',
        "tok = AutoTokenizer.from_pretrained(path)",
        f"model = {loader}.from_pretrained(path)", "```", "",
        f"- tokenizer: PAD `{tokenizer.pad_token}` (id {tokenizer.pad_token_id}) distinct from EOS `{tokenizer.eos_token}` "
        f"(id {tokenizer.eos_token_id}); pads on the {padding_side}; `model_max_length` = {ctx} (the context).",
        f"- input format: the formatted prompt, then the reply, then EOS; a prompt P is formatted as "
        f"`{json.dumps(format_prompt('P', tokenizer))}` (`rlhf_book.tokenizer.format_prompt`).",
        "", "Written by `rlhf_book.export.save_model` (the RLHF notebook textbook's library).", "",
    ]
    (directory / "README.md").write_text("\n".join(card))
    return directory
