"""A byte-level BPE tokenizer trained on the world's corpus, with distinct PAD and EOS."""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["PAD", "EOS", "SEP", "train_tokenizer", "format_prompt"]

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
