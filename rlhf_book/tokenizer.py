"""A byte-level BPE tokenizer trained on the world's corpus, with distinct PAD and EOS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["PAD", "EOS", "SEP", "train_tokenizer", "format_prompt", "save_tokenizer"]

PAD, EOS = "<|pad|>", "<|endoftext|>"
SEP = "\n"  # ends every prompt; the response starts right after it


def format_prompt(prompt: str) -> str:
    """The text the policy conditions on: the prompt followed by the separator."""
    return prompt + SEP


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; PAD (id 0) != EOS (id 1), left padding for generation."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    fast.padding_side = "left"
    return fast


# Keys a tokenizer loaded from disk records about where it came from; they mean nothing to the next reader.
_VOLATILE_KEYS = ("is_local", "local_files_only", "name_or_path")


def save_tokenizer(tokenizer, directory: str | Path, model_max_length: int | None = None, padding_side: str = "left") -> Path:
    """``save_pretrained`` with the settings a plain ``AutoTokenizer.from_pretrained`` should see.

    Writes ``padding_side`` and ``model_max_length`` (the model's context, so that
    ``truncation=True`` truncates) into ``tokenizer_config.json``, and names the class
    ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x both load (5.x alone knows
    ``TokenizersBackend``, the name it writes), with ``input_ids`` and ``attention_mask`` as
    its only model inputs. Not atomic by itself: callers write into
    a directory that is renamed into place when complete.
    """
    directory = Path(directory)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer.padding_side = padding_side
    if model_max_length is not None:
        tokenizer.model_max_length = int(model_max_length)
    tokenizer.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in _VOLATILE_KEYS:
        cfg.pop(k, None)
    # model_input_names: without it transformers 4.x also returns token_type_ids (zeros), and GPT-2 then adds
    # the embedding of token 0 (PAD) to every position of a plain ``model(**tok(texts))`` call
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", padding_side=padding_side,
               model_input_names=["input_ids", "attention_mask"])
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return directory
