"""Tiny random-weight checkpoints of real architectures, built and saved locally (no model hub).

For tests, examples and a reader's experiments with the library on the architectures
practitioners fine-tune (Llama, Qwen2, Qwen3, GPT-NeoX, GPT-2) without downloading one:
:func:`save_tiny_model` writes a directory that ``AutoModelForCausalLM.from_pretrained``
and :func:`rlhf_book.load_base_model` load like any saved checkpoint, with a byte-level BPE
tokenizer trained on a few lines, optionally a ChatML chat template and a
``generation_config.json`` listing extra end-of-turn ids (as Llama 3 and Qwen chat
checkpoints do). The weights are random: such a model says nothing, but every code path
(rotary positions, GQA, tied or untied heads, bf16 storage) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["ARCHITECTURES", "CHATML_TEMPLATE", "tiny_config", "tiny_tokenizer", "save_tiny_model"]

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt_neox", "gpt2")

# ChatML, as Qwen's chat checkpoints write it (a system turn is optional)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = ("the weather in oslo is sunny warm cold rainy windy calm bright grey mild lovely awful good bad fine "
          "today tomorrow morning evening city town review food service film hotel music was were and but it "
          "great terrible nice poor clear stormy snow fog hot dry wet").split()


def _lines(n: int = 400) -> list[str]:
    """``n`` short deterministic sentences to train the tokenizer on."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 10, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (k,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx).capitalize() + ".")
    return out


def tiny_tokenizer(vocab_size: int = 320, chat: bool = True, bos: bool = False):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of about ``vocab_size`` tokens, no PAD token.

    ``chat``: ChatML special tokens, :data:`CHATML_TEMPLATE` and EOS ``<|im_end|>`` (also
    ``<|endoftext|>`` as an extra end id for the generation config); else EOS ``</s>``.
    ``bos``: the post-processor adds ``<s>`` in front of every text (Llama-style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] if chat else ["<s>", "</s>"]
    if bos and "<s>" not in specials:
        specials.append("<s>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_lines(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    kw = {"eos_token": "<|im_end|>"} if chat else {"eos_token": "</s>"}
    if bos:
        kw["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    if chat:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, context: int = 128, **overrides):
    """A transformers config of ``arch`` (one of :data:`ARCHITECTURES`) at a tiny size (GQA: 4 query, 2 KV heads)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=2 * hidden, max_position_embeddings=context)
    if arch == "llama":
        cfg = LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif arch == "qwen3":
        cfg = Qwen3Config(num_key_value_heads=2, tie_word_embeddings=True, head_dim=hidden // 4, **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, tie_word_embeddings=False, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=context,
                         bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_tiny_model(directory: str | Path, arch: str = "llama", *, dtype: torch.dtype = torch.float32,
                    chat: bool = True, seed: int = 0, hidden: int = 64, layers: int = 2, **config_overrides) -> Path:
    """Build a random-weight ``arch`` causal LM and its tokenizer; ``save_pretrained`` both into ``directory``.

    ``dtype``: the stored dtype (``torch.bfloat16`` as real checkpoints ship). With ``chat``
    the tokenizer has a chat template and ``generation_config.json`` lists two end ids,
    ``<|im_end|>`` and ``<|endoftext|>``. ``config_overrides`` set config attributes (e.g.
    ``attention_dropout=0.1``). Returns the directory.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory)
    tok = tiny_tokenizer(chat=chat, bos=arch == "llama")
    cfg = tiny_config(arch, len(tok), hidden=hidden, layers=layers, **config_overrides)
    cfg.eos_token_id = tok.eos_token_id
    if tok.bos_token_id is not None:
        cfg.bos_token_id = tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    if chat:
        model.generation_config = GenerationConfig(
            eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")])
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
