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
  (``tokenizer`` may be None, as when a tokenizer is being trained; ``prompt`` is whatever the
  caller passed, a string or a list of messages); ``set_prompt_format(None)``
  restores the default. It returns the format it replaced, so a caller can put it back.

A prompt is a string or a conversation: a list of ``{"role": ..., "content": ...}`` messages
(e.g. a system turn and a user turn), TRL's conversational format. Under the default format:

* messages go through the chat template as they are
  (``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``); a tokenizer
  without a chat template cannot format them (ValueError);
* a string is one user turn, as above, *unless it is already formatted*: a string that holds
  one of the special tokens the template writes (``<|im_start|>`` for ChatML) is taken as the
  template's output and passed through unchanged, never wrapped a second time; such a string
  must end with the template's generation prompt (``<|im_start|>assistant\\n``), else ValueError
  (it would make the model write the user's turn). :func:`is_formatted` is the test.

:func:`check_prompt` validates one prompt and :func:`format_prompts` formats a list, its errors
naming ``prompts[i]``.

A prompt and its reply are tokenized apart and concatenated (:func:`encode_prompt_response`):
the prompt text with the tokenizer's special tokens (a BOS, if it adds one) unless a chat
template wrote them into the text (:func:`prompt_add_special_tokens`), the reply without,
then EOS for a reply that ended with one (``eos_ids``: the end id each reply was sampled with, when the
model has several, see :func:`rlhf_book.rollout.stop_token_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "PAD", "EOS", "SEP", "train_tokenizer", "format_prompt", "format_prompts", "default_prompt_format",
    "set_prompt_format", "prompt_format_tag", "prompt_add_special_tokens", "encode_prompt_response", "save_tokenizer",
    "check_prompt", "is_messages", "is_formatted", "prompt_as_text",
]

PAD, EOS = "<|pad|>", "<|endoftext|>"
SEP = "\n"  # ends every prompt under the default format; the response starts right after it

PromptFormat = Callable[[object, object], str]
_custom_format: PromptFormat | None = None  # set by set_prompt_format; None: the default
_PROBE = "<prompt>"  # what prompt_format_tag formats to tell one format from another


def is_messages(prompt) -> bool:
    """Whether ``prompt`` is a conversation (a list or tuple of messages) rather than a string."""
    return isinstance(prompt, (list, tuple))


def check_prompt(prompt, where: str = "prompt"):
    """``prompt`` checked: a non-empty string, or a non-empty list of ``{"role": str, "content": str}`` messages.

    Returns the string, or the messages as a list of dicts (shallow copies). ValueError names
    ``where`` (e.g. ``prompts[3]``) and, for a message, its index and field (``prompts[3][1]: field 'content' ...``).
    """
    if isinstance(prompt, str):
        if prompt.strip():
            return prompt
    elif is_messages(prompt) and len(prompt) > 0:
        out = []
        for j, m in enumerate(prompt):
            if not isinstance(m, Mapping):
                raise ValueError(f"{where}[{j}] must be a message {{'role': ..., 'content': ...}} (a prompt is a "
                                 f"string or a list of messages), got {m!r}")
            for field in ("role", "content"):
                if field not in m:
                    raise ValueError(f"{where}[{j}]: missing field {field!r} (a message needs 'role' and 'content')")
                if not isinstance(m[field], str):
                    raise ValueError(f"{where}[{j}]: field {field!r} must be a string, got {type(m[field]).__name__}")
            if not m["role"].strip():
                raise ValueError(f"{where}[{j}]: field 'role' is empty")
            out.append(dict(m))
        if not any(m["content"].strip() for m in out):
            raise ValueError(f"{where}: every message's 'content' is empty")
        return out
    raise ValueError(f"{where} must be a non-empty string or a non-empty list of {{'role': ..., 'content': ...}} "
                     f"messages, got {prompt!r}")


def prompt_as_text(prompt) -> str:
    """Plain text of a prompt for a reward function that reads text: a string itself, for messages the last user turn's content."""
    if not is_messages(prompt):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


_template_info: dict = {}  # (chat template, special tokens) -> (markers, generation prompt)


def _chat_template_info(tokenizer) -> tuple[tuple[str, ...], str]:
    """(special tokens the chat template writes, its generation prompt), computed once per template."""
    specials = list(getattr(tokenizer, "all_special_tokens", []) or [])
    specials += [str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    key = (tokenizer.chat_template, tuple(sorted(set(specials))))
    if key not in _template_info:
        turn = [{"role": "user", "content": "x"}]
        try:
            with_gen = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            without = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
        except Exception:  # a template that cannot format one user turn: no string is taken as formatted
            with_gen = without = ""
        gen = with_gen[len(without):] if with_gen.startswith(without) else ""
        _template_info[key] = (tuple(t for t in key[1] if t and t in with_gen), gen)
    return _template_info[key]


def is_formatted(prompt, tokenizer) -> bool:
    """Whether the string ``prompt`` already holds the chat template's output (one of the special tokens it writes)."""
    if not isinstance(prompt, str) or not getattr(tokenizer, "chat_template", None):
        return False
    markers, _ = _chat_template_info(tokenizer)
    return any(m in prompt for m in markers)


def default_prompt_format(prompt, tokenizer=None) -> str:
    """The tokenizer's chat template if it has one (a string: one user turn; messages as given; both with the
    generation prompt; a string already formatted passes through), else ``prompt + SEP`` (strings only)."""
    if getattr(tokenizer, "chat_template", None):
        if is_formatted(prompt, tokenizer):
            gen = _chat_template_info(tokenizer)[1]
            if not prompt.endswith(gen):
                raise ValueError(f"prompt {prompt[:60]!r}... is already formatted by the chat template but does not end "
                                 f"with its generation prompt {gen!r}: pass the messages instead, or the whole "
                                 f"formatted prompt (apply_chat_template(..., add_generation_prompt=True))")
            return prompt
        messages = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if is_messages(prompt):
        raise ValueError("prompt is a list of messages, but the tokenizer has no chat template to format them "
                         "(tokenizer.chat_template is not set): pass a string, set a chat template, or "
                         "set_prompt_format(fn) with a format that takes messages")
    return prompt + SEP


def format_prompt(prompt, tokenizer=None) -> str:
    """The text the policy conditions on for ``prompt`` (a string or messages): the format in effect (see the module docstring)."""
    fn = _custom_format or default_prompt_format
    if is_messages(prompt):
        prompt = check_prompt(prompt)
    text = fn(prompt, tokenizer)
    if not isinstance(text, str):
        raise ValueError(f"the prompt format {_name(fn)} must return a string, got {type(text).__name__}")
    return text


def format_prompts(prompts: Sequence, tokenizer=None) -> list[str]:
    """:func:`format_prompt` of each prompt; a ValueError names the prompt, ``prompts[i]``."""
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(format_prompt(check_prompt(p, f"prompts[{i}]") if is_messages(p) else p, tokenizer))
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(f"prompts[{i}]") else f"prompts[{i}]: {msg}") from None
    return out


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


def encode_prompt_response(tokenizer, prompts: Sequence, responses: Sequence[str], terminated=None,
                           eos_ids: Sequence[int | None] | None = None) -> list:
    """Ids of ``format_prompt(prompt, tokenizer) + response`` (+ EOS where ``terminated``, default all), per pair.

    ``eos_ids`` (optional, one per pair): the end id each terminated reply ended with, for a
    model with several stop ids (:func:`rlhf_book.rollout.stop_token_ids`); None (or a None
    entry): ``tokenizer.eos_token_id``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    terminated = [True] * len(prompts) if terminated is None else list(terminated)
    eos_ids = [None] * len(prompts) if eos_ids is None else list(eos_ids)
    prompt_ids = tokenizer(format_prompts(prompts, tokenizer),
                           add_special_tokens=prompt_add_special_tokens(tokenizer))["input_ids"]
    reply_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [p + r + ([eos if e is None else int(e)] if t else [])
            for p, r, t, e in zip(prompt_ids, reply_ids, terminated, eos_ids)]


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
    a directory that is renamed into place when complete. ``tokenizer``'s own padding side
    is left as it was (saving a reward model must not make the policy's tokenizer pad on the right).
    """
    directory = Path(directory)
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    before = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    if model_max_length is not None:
        tokenizer.model_max_length = int(model_max_length)
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.padding_side = before
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
