"""The base language model: a small GPT-2 trained from scratch, on the world's corpus or on your texts.

``load_base_model("cpu")`` builds it the first time (the README gives the time), caches it, and loads it from the cache afterwards. Any other argument is
treated as a Hugging Face model name or a local directory, so a reader with a hub
(or their own checkpoint) uses the same call: ``load_base_model("gpt2")``.

``train_base_model(texts)`` trains one on a reader's own documents, with the same
recipe and training loop (the cached book build is that function on the book's corpus)::

    model, tokenizer, history = train_base_model([{"prompt": p, "response": r}, ...], preset="cpu")

A *history* is a list of per-step rows ``{"step": 1-based optimizer step, "train_loss": ...}``;
the rows of steps with an evaluation also hold ``val_loss``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from transformers.utils import logging as hf_logging

from .cache import artifact_key, cache_dir, cached_artifact
from .checkpoint import resume_or_restart, rng_state, save_checkpoint, set_rng_state
from .corpus import Example, generate_examples
from .export import save_model
from .rollout import _context_size
from .runtime import adam, autocast, dtype_kwargs, enable_tf32, get_device, resolve_dtype, set_seed
from .tokenizer import (
    EOS, PAD, encode_prompt_response, format_prompt, prompt_format_tag, save_tokenizer, train_tokenizer,
)

__all__ = [
    "Preset", "PRESETS", "WORLD_VERSION", "load_base_model", "build_base_model", "train_base_model", "encode_examples",
    "lm_loss", "base_model_path", "base_model_metadata", "artifact_name", "resolve_model_name", "SAVE_FORMAT",
]

hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the book's own

WORLD_VERSION = 1  # bump when the corpus, tokenizer or training recipe changes
# bump when what a saved model directory holds changes (2: tokenizer settings, model card;
# 3: metadata.json histories as per-step rows, the card's input format from format_prompt)
SAVE_FORMAT = 3
TOKENIZER_TEXTS = 20_000  # a tokenizer trained by train_base_model learns from the first this many texts


@dataclass(frozen=True)
class Preset:
    """Architecture and training recipe of a base model."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    steps: int
    batch_size: int
    lr: float
    warmup: int = 30
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0


PRESETS: dict[str, Preset] = {
    # tests: seconds; not a good model
    "tiny": Preset(n_layer=1, n_embd=32, n_head=2, n_positions=96, vocab_size=512, steps=40, batch_size=16, lr=5e-3, warmup=5, eval_every=20, checkpoint_every=10),
    # the book's default on a laptop / CI: ~0.5M parameters
    "cpu": Preset(n_layer=2, n_embd=128, n_head=4, n_positions=96, vocab_size=1024, steps=600, batch_size=64, lr=3e-3),
    # a lent GPU: ~32M parameters
    "gpu": Preset(n_layer=8, n_embd=576, n_head=9, n_positions=128, vocab_size=2048, steps=3000, batch_size=128, lr=6e-4, warmup=200, eval_every=250, checkpoint_every=500),
}


def _text_parts(item, where: str) -> tuple[str | None, str]:
    """(prompt, body) of one training text: (None, text) for a document, (prompt, response) for a record."""
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{where} is an empty document")
        return None, item
    if isinstance(item, Example):
        return item.prompt, item.response
    if not isinstance(item, Mapping):
        raise ValueError(
            f"{where} must be a document (a string) or a record {{'prompt': ..., 'response': ...}}, "
            f"got {type(item).__name__}"
        )
    for field in ("prompt", "response"):
        if field not in item:
            raise ValueError(f"{where}: missing field {field!r} (a record needs 'prompt' and 'response')")
        if not isinstance(item[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(item[field]).__name__}")
    if not item["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    return item["prompt"], item["response"]


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples, what: str = "examples") -> list[list[int]]:
    """Ids of each text + EOS: a record as ``format_prompt(prompt, tokenizer) + response``, a string as is.

    An item is a document (a string), a record ``{"prompt": ..., "response": ...}`` or a
    :class:`rlhf_book.corpus.Example`; errors name ``what[i]`` and the field.
    """
    if isinstance(examples, (str, Mapping)) or not isinstance(examples, Sequence):
        raise ValueError(f"{what} must be a list of documents or records, got {type(examples).__name__}")
    parts = [_text_parts(x, f"{what}[{i}]") for i, x in enumerate(examples)]
    pairs = [i for i, (p, _) in enumerate(parts) if p is not None]
    docs = [i for i, (p, _) in enumerate(parts) if p is None]
    out: list[list[int]] = [[] for _ in parts]
    encoded = encode_prompt_response(tokenizer, [parts[i][0] for i in pairs], [parts[i][1] for i in pairs])
    for i, ids in zip(pairs, encoded):
        out[i] = ids
    if docs:
        for i, ids in zip(docs, tokenizer([parts[i][1] for i in docs])["input_ids"]):
            out[i] = ids + [tokenizer.eos_token_id]
    return out


def _collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs``; returns (input_ids (B, T), attention_mask (B, T))."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over real (non-pad) target tokens; inputs (B, T)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@torch.no_grad()
def _val_loss(model, data: list[list[int]], pad_id: int, device, batch_size: int = 128) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, mask = _collate(data[i : i + batch_size], pad_id)
        k = int(mask[:, 1:].sum())
        tot += lm_loss(model, ids.to(device), mask.to(device)).item() * k
        n += k
    model.train()
    return tot / n


def _resolve_preset(preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))} or a Preset, got {preset!r}")


def _check_texts(texts, what: str) -> None:
    """Raise ValueError naming ``what`` (index, field) unless ``texts`` is a non-empty list of training texts."""
    if isinstance(texts, (str, Mapping)) or not isinstance(texts, Sequence):
        raise ValueError(f"{what} must be a list of documents or records, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{what} is empty: pass at least one text")
    for i, t in enumerate(texts):
        _text_parts(t, f"{what}[{i}]")


def _encode_for_training(tokenizer, texts, what: str, n_positions: int) -> list[list[int]]:
    """:func:`encode_examples` of ``texts``, each checked to fit the context of ``n_positions`` tokens."""
    ids = encode_examples(tokenizer, texts, what)
    for i, s in enumerate(ids):
        if len(s) > n_positions:
            raise ValueError(
                f"{what}[{i}] is {len(s)} tokens with EOS, longer than the context of n_positions={n_positions}"
            )
    return ids


def _tokenizer_text(item) -> str:
    """The text a new tokenizer learns from for one training text (prompt formatted without a tokenizer)."""
    prompt, body = _text_parts(item, "text")
    return body if prompt is None else format_prompt(prompt) + body


def _check_tokenizer(tokenizer) -> None:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token: add one, e.g. tokenizer.add_special_tokens({'eos_token': ...})")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "tokenizer needs a PAD token distinct from EOS (PAD == EOS would mask EOS out of training): "
            f"tokenizer.add_special_tokens({{'pad_token': {PAD!r}}})"
        )


def _train_or_resume_tokenizer(texts, vocab_size: int, n_positions: int, checkpoint_dir: Path | None):
    """A new BPE tokenizer for ``texts``; with ``checkpoint_dir``, saved there whole (and reused when a run resumes)."""
    tok_dir = checkpoint_dir / "tokenizer" if checkpoint_dir is not None else None
    tokenizer = _resume_tokenizer(tok_dir) if tok_dir is not None else None
    if tokenizer is None:
        tokenizer = train_tokenizer((_tokenizer_text(t) for t in texts[:TOKENIZER_TEXTS]), vocab_size=vocab_size)
        if tok_dir is not None:
            tmp = checkpoint_dir / "tokenizer.tmp"  # written whole, then renamed: "tokenizer/" exists only when complete
            shutil.rmtree(tmp, ignore_errors=True)
            save_tokenizer(tokenizer, tmp, n_positions)
            os.rename(tmp, tok_dir)
    return tokenizer


def _lr_schedule(preset: Preset):
    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < preset.warmup:
            return (step + 1) / preset.warmup
        frac = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return lr_at


def train_base_model(
    texts: Sequence,
    preset: str | Preset = "cpu",
    tokenizer=None,
    device: torch.device | str | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    val_texts: Sequence | None = None,
    seed: int | None = None,
):
    """Train a GPT-2 from scratch on ``texts``; returns ``(model, tokenizer, history)``, the model in eval mode.

    ``texts``: documents (strings, each trained on as text + EOS) or records
    ``{"prompt": ..., "response": ...}`` (as ``format_prompt(prompt, tokenizer) + response + EOS``,
    the form RL samples and scores), mixed freely. Step s trains on the ``preset.batch_size``
    texts after the first ``s * batch_size``, in the order given, wrapping around (shuffle
    them first if their order means something). ``preset``: a name of :data:`PRESETS` or a
    :class:`Preset` (architecture, steps, batch size, learning rate, when to evaluate and
    checkpoint). ``tokenizer``: None trains a byte-level BPE of ``preset.vocab_size`` on the
    first ``TOKENIZER_TEXTS`` texts; a given one needs EOS and a distinct PAD. ``val_texts``:
    the same forms, for ``val_loss`` every ``preset.eval_every`` steps and at the end (None: no
    evaluation). ``checkpoint_dir``: written every ``preset.checkpoint_every`` steps and at the
    end, and resumed from (with the tokenizer trained there); one folder per run. ``seed``:
    the initialisation (default ``preset.seed``). History: see the module docstring.
    """
    preset = _resolve_preset(preset)
    device = torch.device(device) if device is not None else get_device()
    _check_texts(texts, "texts")  # before anything slow
    if val_texts is not None:
        _check_texts(val_texts, "val_texts")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = _train_or_resume_tokenizer(texts, preset.vocab_size, preset.n_positions, ckpt_dir)
    _check_tokenizer(tokenizer)
    train_ids = _encode_for_training(tokenizer, texts, "texts", preset.n_positions)
    val_ids = None if val_texts is None else _encode_for_training(tokenizer, val_texts, "val_texts", preset.n_positions)

    set_seed(preset.seed if seed is None else seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=preset.n_positions, n_embd=preset.n_embd, n_layer=preset.n_layer,
        n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).to(device)
    # GPU path: fused AdamW, TF32, bf16 autocast. On a CPU the unfused fp32 recipe the cached
    # world was built with (WORLD_VERSION) stays as it is, so cached models stay valid.
    enable_tf32(device)
    opt = adam(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_schedule(preset))
    history: list[dict] = []
    start, ckpt = 0, (ckpt_dir / "train_state.pt" if ckpt_dir is not None else None)
    state = resume_or_restart(ckpt, model=model, optimizer=opt, scheduler=sched) if ckpt is not None else None
    if state is not None:  # (an unreadable checkpoint is discarded with a warning: training restarts)
        if not isinstance(state["history"], list):
            raise ValueError(f"{ckpt}: written by an older version of the library (another history format); "
                             "delete it to start over")
        start, history = state["step"], state["history"]
        set_rng_state(state["rng"])
    model.train()
    bar = tqdm(range(start, preset.steps), desc="base LM", disable=not progress, initial=start, total=preset.steps)
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) on the device, read in one go (a read stalls a GPU)

    def flush() -> None:
        if pending:
            values = torch.stack([v for _, v in pending]).tolist()
            history.extend({"step": s, "train_loss": round(v, 5)} for (s, _), v in zip(pending, values))
            pending.clear()

    n, B = len(train_ids), preset.batch_size
    for step in bar:
        batch = [train_ids[(step * B + j) % n] for j in range(B)]
        ids, mask = _collate(batch, tokenizer.pad_token_id)
        with autocast(device):
            loss = lm_loss(model, ids.to(device), mask.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        pending.append((step + 1, loss.detach()))
        last = step + 1 == preset.steps
        if val_ids is not None and ((step + 1) % preset.eval_every == 0 or last):
            flush()
            history[-1]["val_loss"] = round(_val_loss(model, val_ids, tokenizer.pad_token_id, device), 5)
            bar.set_postfix(val_loss=history[-1]["val_loss"])
        if ckpt is not None and ((step + 1) % preset.checkpoint_every == 0 or last):
            flush()
            save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, step=step + 1, history=history,
                            rng=rng_state())
    flush()
    bar.close()
    return model.eval(), tokenizer, history


def build_base_model(preset: Preset, workdir: Path, device: torch.device | None = None, progress: bool = True,
                     preset_name: str | None = None) -> dict:
    """:func:`train_base_model` on the book's corpus for ``preset``, saved into ``workdir``; resumes from it.

    Every step of a build can be killed: the tokenizer directory appears only when
    complete, an unreadable checkpoint is discarded, and a build that saved everything
    is not repeated.

    Returns metadata (parameters, losses, seconds) that is also written to ``workdir/metadata.json``.
    """
    device = torch.device(device) if device is not None else get_device()
    workdir = Path(workdir)
    done = _finished_build(workdir)
    if done is not None:  # killed after the model was saved but before the cache marker
        return done
    examples = generate_examples(preset.steps * preset.batch_size, seed=preset.seed)
    val_examples = generate_examples(512, seed=preset.seed + 1_000_003)
    t0 = time.time()
    model, tokenizer, history = train_base_model(
        examples, preset, device=device, progress=progress, checkpoint_dir=workdir, val_texts=val_examples
    )
    save_model(
        model, tokenizer, workdir,
        title=f"rlhf_book base LM, preset {preset_name!r}" if preset_name else "rlhf_book base LM",
        description=(
            f"A GPT-2 ({preset.n_layer} layers x {preset.n_embd}, context {preset.n_positions}) trained from scratch "
            "on the book's generated corpus of short reviews; the reference policy of every RL chapter."
        ),
    )
    shutil.rmtree(workdir / "tokenizer", ignore_errors=True)  # the training-time copy; the saved model has its own
    meta = {
        "preset": asdict(preset), "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer), "final_val_loss": [r for r in history if "val_loss" in r][-1]["val_loss"],
        "train_seconds": round(time.time() - t0, 1),
        "device": str(device), "history": history, "world_version": WORLD_VERSION, "save_format": SAVE_FORMAT,
    }
    tmp = workdir / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, workdir / "metadata.json")  # last: its presence means the model and tokenizer are saved
    ckpt = workdir / "train_state.pt"
    if ckpt.exists():
        ckpt.unlink()
    return {k: v for k, v in meta.items() if k != "history"}


def _finished_build(workdir: Path) -> dict | None:
    """The metadata of a build that saved everything but was killed before the cache marker, else None."""
    try:
        meta = json.loads((workdir / "metadata.json").read_text())
        AutoTokenizer.from_pretrained(workdir)
    except Exception:  # absent, cut off, or unloadable: build (the rest of) it
        return None
    return {k: v for k, v in meta.items() if k != "history"}


def _resume_tokenizer(tok_dir: Path):
    """The tokenizer an interrupted build already trained, or None (and the directory removed) if it does not load."""
    if not tok_dir.exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(tok_dir)
    except Exception:  # e.g. emptied by a kill in an older version: retrain (training is deterministic)
        shutil.rmtree(tok_dir, ignore_errors=True)
        return None


def artifact_name(preset_name: str, preset: Preset) -> str:
    """Cache key of a base LM: preset, the world (corpus) version, the saved format (and a custom prompt format)."""
    recipe = {"preset": asdict(preset), "world": WORLD_VERSION, "format": SAVE_FORMAT}
    if prompt_format_tag() is not None:  # set_prompt_format changes the training text
        recipe["prompt_format"] = prompt_format_tag()
    return artifact_key("base", preset_name, recipe)


def load_base_model(name_or_path: str = "cpu", device: torch.device | str | None = None, progress: bool = True,
                    dtype="auto"):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path``: a preset (``"tiny"``, ``"cpu"``, ``"gpu"``; built and cached on first
    use), a local directory saved with ``save_pretrained``, or a hub model name. The
    tokenizer pads on the left and has a PAD token distinct from EOS. ``dtype`` of the
    weights: "auto" (the checkpoint's own dtype; the presets are fp32), "float32"/"fp32",
    "bfloat16"/"bf16", "float16" or a ``torch.dtype``; on transformers 4.x and 5.x alike. What the
    trainers then do with it: :mod:`rlhf_book.runtime` (trainable weights held in fp32).
    """
    device = torch.device(device) if device is not None else get_device()
    resolve_dtype(dtype)  # a bad dtype fails before anything slow
    path = resolve_model_name(name_or_path)
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        path = cached_artifact(artifact_name(name_or_path, preset),
                               lambda d: build_base_model(preset, d, device, progress, name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwargs(dtype))
    except Exception as e:  # OSError, ValueError, safetensors' SafetensorError (a truncated or garbage file), ...
        if name_or_path in PRESETS:
            raise ValueError(
                f"the cached base LM {name_or_path!r} at {path} does not load ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Delete that folder to rebuild it."
            ) from None
        if os.path.isdir(str(path)):
            raise ValueError(f"cannot load the model in {path}: a directory without a saved model, or one whose "
                             f"files are missing, cut off or not model files ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); save it again with save_pretrained") from None
        where = "is not a local directory" if not os.path.isdir(str(path)) else "is a directory without a saved model"
        raise ValueError(
            f"cannot load model {str(name_or_path)!r}: it is not a preset ({', '.join(PRESETS)}), {where}, "
            f"and it could not be fetched from a model hub (offline here?). Original error: {e}"
        ) from None
    _ensure_pad_token(model, tokenizer)
    tokenizer.padding_side = "left"
    ctx = _context_size(model)
    if ctx is not None and not tokenizer.model_max_length <= ctx:  # hub tokenizers often say 1e30
        tokenizer.model_max_length = ctx
    return model.to(device).eval(), tokenizer


def resolve_model_name(name_or_path) -> str:
    """Check a model argument before anything slow: a preset, an existing directory, or a hub name.

    A name one typo away from a preset (``"tinyy"``) fails at once instead of after a
    minute of hub retries.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(f"model must be a preset ({', '.join(PRESETS)}), a directory or a hub name, got {name_or_path!r}")
    name = str(name_or_path)
    if name in PRESETS or os.path.isdir(name):
        return name
    close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.6)
    if close:
        raise ValueError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) nor a directory; "
                         f"did you mean the preset {close[0]!r}?")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:  # a path, not "org/name"
        raise ValueError(f"cannot load model {name!r}: no such directory")
    return name


def _ensure_pad_token(model, tokenizer) -> None:
    """Give a hub tokenizer a PAD distinct from EOS (PAD == EOS would mask EOS out of training)."""
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id


def base_model_path(name: str = "cpu") -> Path:
    """Where the cached preset ``name`` lives (it may not be built yet)."""
    return cache_dir() / artifact_name(name, PRESETS[name])


def base_model_metadata(name: str = "cpu") -> dict:
    """Training record of a built preset (parameters, loss history, seconds); builds it if needed."""
    if not (base_model_path(name) / "metadata.json").exists():
        load_base_model(name, device="cpu", progress=False)
    return json.loads((base_model_path(name) / "metadata.json").read_text())
