"""A byte-level BPE tokenizer trained on the world's corpus, with distinct PAD and EOS; the prompt format.

The prompt format is one replaceable function. Every part of the library that turns a
prompt into the text a model conditions on calls :func:`format_prompt` (base-LM training
text, sampling, reward-model scoring, the TRL bridge), so a model is always trained,
sampled and scored on the same text:

* the default, :func:`default_prompt_format`: a tokenizer with a chat template
  (``tokenizer.chat_template``) gets it, as one user turn with the generation prompt
  (``apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
  add_generation_prompt=True)``); any other tokenizer (the book's) gets ``prompt + SEP``,
  ``SEP = "\\n"``;
* ``set_prompt_format(fn)`` replaces it for the whole process, ``fn(prompt, tokenizer) -> str``
  (``tokenizer`` may be None, as when a tokenizer is being trained); ``set_prompt_format(None)``
  restores the default. It returns the format it replaced, so a caller can put it back.

A prompt and its reply are tokenized apart and concatenated (:func:`encode_prompt_response`):
the prompt text with the tokenizer's special tokens (a BOS, if it adds one) unless a chat
template wrote them into the text (:func:`prompt_add_special_tokens`), the reply without,
then EOS for a reply that ended with one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "PAD", "EOS", "SEP", "train_tokenizer", "format_prompt", "default_prompt_format", "set_prompt_format",
    "prompt_format_tag", "prompt_add_special_tokens", "encode_prompt_response", "save_tokenizer",
]

PAD, EOS = "<|pad|>", "<|endoftext|>"
SEP = "\n"  # ends every prompt under the default format; the response starts right after it

PromptFormat = Callable[[str, object], str]
_custom_format: PromptFormat | None = None  # set by set_prompt_format; None: the default
_PROBE = "<prompt>"  # what prompt_format_tag formats to tell one format from another


def default_prompt_format(prompt: str, tokenizer=None) -> str:
    """The tokenizer's chat template (one user turn, generation prompt) if it has one, else ``prompt + SEP``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + SEP


def format_prompt(prompt: str, tokenizer=None) -> str:
    """The text the policy conditions on for ``prompt``: the format in effect (see the module docstring)."""
    fn = _custom_format or default_prompt_format
    text = fn(prompt, tokenizer)
    if not isinstance(text, str):
        raise ValueError(f"the prompt format {_name(fn)} must return a string, got {type(text).__name__}")
    return text


def set_prompt_format(fn: PromptFormat | None) -> PromptFormat | None:
    """Make ``fn(prompt, tokenizer) -> str`` the process's prompt format (None: the default); returns the old one."""
    global _custom_format
    if fn is not None and not callable(fn):
        raise ValueError(f"set_prompt_format: fn must be a function (prompt, tokenizer) -> str or None, got {fn!r}")
    previous, _custom_format = _custom_format, fn
    return previous


def prompt_format_tag() -> str | None:
    """None under the default format, else a string naming the format in effect (for cache keys)."""
    if _custom_format is None:
        return None
    try:
        return format_prompt(_PROBE)
    except Exception:  # a format that needs a tokenizer: name it instead
        return _name(_custom_format)


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def prompt_add_special_tokens(tokenizer) -> bool:
    """Whether a formatted prompt is tokenized with the tokenizer's special tokens: not when a chat template wrote them."""
    return getattr(tokenizer, "chat_template", None) is None


def encode_prompt_response(tokenizer, prompts: Sequence[str], responses: Sequence[str], terminated=None) -> list:
    """Ids of ``format_prompt(prompt, tokenizer) + response`` (+ EOS where ``terminated``, default all), per pair."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    terminated = [True] * len(prompts) if terminated is None else list(terminated)
    prompt_ids = tokenizer([format_prompt(p, tokenizer) for p in prompts],
                           add_special_tokens=prompt_add_special_tokens(tokenizer))["input_ids"]
    reply_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return [p + r + (eos if t else []) for p, r, t in zip(prompt_ids, reply_ids, terminated)]


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
