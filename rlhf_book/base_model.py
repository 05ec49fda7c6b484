"""The base language model: a small GPT-2 trained from scratch on the world's corpus.

``load_base_model("cpu")`` builds it the first time (about 1-2 minutes on two
cores), caches it, and loads it from the cache afterwards. Any other argument is
treated as a Hugging Face model name or a local directory, so a reader with a hub
(or their own checkpoint) uses the same call: ``load_base_model("gpt2")``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from transformers.utils import logging as hf_logging

from .cache import artifact_key, cache_dir, cached_artifact
from .checkpoint import resume_or_restart, rng_state, save_checkpoint, set_rng_state
from .export import save_model
from .corpus import generate_examples
from .runtime import adam, autocast, enable_tf32, get_device, set_seed
from .rollout import _context_size
from .tokenizer import EOS, PAD, format_prompt, save_tokenizer, train_tokenizer

__all__ = [
    "Preset", "PRESETS", "WORLD_VERSION", "load_base_model", "build_base_model", "encode_examples", "lm_loss",
    "base_model_path", "base_model_metadata", "artifact_name", "resolve_model_name", "SAVE_FORMAT",
]

hf_logging.disable_progress_bar()  # "Loading weights" bars would drown the book's own

WORLD_VERSION = 1  # bump when the corpus, tokenizer or training recipe changes
SAVE_FORMAT = 2  # bump when what a saved model directory holds changes (2: tokenizer settings, model card)


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
    # the book's default on a laptop / CI: ~0.5M parameters, builds in 1-2 minutes on 2 cores
    "cpu": Preset(n_layer=2, n_embd=128, n_head=4, n_positions=96, vocab_size=1024, steps=600, batch_size=64, lr=3e-3),
    # a lent GPU: ~32M parameters
    "gpu": Preset(n_layer=8, n_embd=576, n_head=9, n_positions=128, vocab_size=2048, steps=3000, batch_size=128, lr=6e-4, warmup=200, eval_every=250, checkpoint_every=500),
}


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples) -> list[list[int]]:
    """Token ids of ``prompt + SEP + response + EOS`` for each example."""
    prompts = tokenizer([format_prompt(e.prompt) for e in examples])["input_ids"]
    responses = tokenizer([e.response for e in examples])["input_ids"]
    return [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]


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


def build_base_model(preset: Preset, workdir: Path, device: torch.device | None = None, progress: bool = True,
                     preset_name: str | None = None) -> dict:
    """Train tokenizer + GPT-2 for ``preset`` into ``workdir``; resumes from ``workdir/train_state.pt``.

    Every step of a build can be killed: the tokenizer directory appears only when
    complete, an unreadable checkpoint is discarded, and a build that saved everything
    is not repeated.

    Returns metadata (parameters, losses, seconds) that is also written to ``workdir/metadata.json``.
    """
    device = device or get_device()
    workdir = Path(workdir)
    n_train = preset.steps * preset.batch_size
    examples = generate_examples(n_train, seed=preset.seed)
    val_examples = generate_examples(512, seed=preset.seed + 1_000_003)
    done = _finished_build(workdir)
    if done is not None:  # killed after the model was saved but before the cache marker
        return done
    tok_dir = workdir / "tokenizer"
    tokenizer = _resume_tokenizer(tok_dir)
    if tokenizer is None:
        texts = (format_prompt(e.prompt) + e.response for e in examples[:20_000])
        tokenizer = train_tokenizer(texts, vocab_size=preset.vocab_size)
        tmp = workdir / "tokenizer.tmp"  # written whole, then renamed: "tokenizer/" exists only when complete
        shutil.rmtree(tmp, ignore_errors=True)
        save_tokenizer(tokenizer, tmp, preset.n_positions)
        os.rename(tmp, tok_dir)
    train_ids = encode_examples(tokenizer, examples)
    val_ids = encode_examples(tokenizer, val_examples)
    longest = max(len(s) for s in train_ids)
    if longest > preset.n_positions:
        raise ValueError(f"corpus sequence of {longest} tokens exceeds n_positions={preset.n_positions}")

    set_seed(preset.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=preset.n_positions, n_embd=preset.n_embd, n_layer=preset.n_layer,
        n_head=preset.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config).to(device)
    # GPU path: fused AdamW, TF32, bf16 autocast. On a CPU the unfused fp32 recipe the cached
    # world was built with (WORLD_VERSION) stays as it is, so cached models stay valid.
    on_gpu = device.type == "cuda"
    enable_tf32(device)
    opt = adam(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=on_gpu)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < preset.warmup:
            return (step + 1) / preset.warmup
        frac = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    start, ckpt = 0, workdir / "train_state.pt"
    state = resume_or_restart(ckpt, model=model, optimizer=opt, scheduler=sched)  # an unreadable one is discarded
    if state is not None:
        start, history = state["step"], state["history"]
        set_rng_state(state["rng"])
    t0 = time.time()
    model.train()
    bar = tqdm(range(start, preset.steps), desc="base LM", disable=not progress, initial=start, total=preset.steps)
    pending: list[torch.Tensor] = []  # per-step losses still on the device, read in one go (a read stalls a GPU)

    def flush() -> None:
        if pending:
            history["train_loss"].extend(round(v, 5) for v in torch.stack(pending).tolist())
            pending.clear()

    for step in bar:
        batch = train_ids[step * preset.batch_size : (step + 1) * preset.batch_size]
        ids, mask = _collate(batch, tokenizer.pad_token_id)
        with autocast(device):
            loss = lm_loss(model, ids.to(device), mask.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        history["step"].append(step + 1)
        pending.append(loss.detach())
        if (step + 1) % preset.eval_every == 0 or step + 1 == preset.steps:
            flush()
            history["val_step"].append(step + 1)
            history["val_loss"].append(round(_val_loss(model, val_ids, tokenizer.pad_token_id, device), 5))
            bar.set_postfix(val_loss=history["val_loss"][-1])
        if (step + 1) % preset.checkpoint_every == 0 and step + 1 < preset.steps:
            flush()
            save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, step=step + 1, history=history, rng=rng_state())
    model.eval()
    save_model(
        model, tokenizer, workdir, title=f"rlhf_book base LM, preset {preset_name!r}" if preset_name else "rlhf_book base LM",
        description=(
            f"A GPT-2 ({preset.n_layer} layers x {preset.n_embd}, context {preset.n_positions}) trained from scratch "
            "on the book's generated corpus of short reviews; the reference policy of every RL chapter."
        ),
    )
    shutil.rmtree(tok_dir, ignore_errors=True)  # the training-time copy; the saved model has its own
    meta = {
        "preset": asdict(preset), "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer), "final_val_loss": history["val_loss"][-1], "train_seconds": round(time.time() - t0, 1),
        "device": str(device), "history": history, "world_version": WORLD_VERSION, "save_format": SAVE_FORMAT,
    }
    tmp = workdir / "metadata.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, workdir / "metadata.json")  # last: its presence means the model and tokenizer are saved
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
    """The cache key of a base LM: its preset, the world (corpus) version and the saved format."""
    return artifact_key("base", preset_name, {"preset": asdict(preset), "world": WORLD_VERSION, "format": SAVE_FORMAT})


def load_base_model(name_or_path: str = "cpu", device: torch.device | str | None = None, progress: bool = True):
    """Return ``(model, tokenizer)`` in eval mode on ``device``.

    ``name_or_path``: a preset (``"tiny"``, ``"cpu"``, ``"gpu"``; built and cached on first
    use), a local directory saved with ``save_pretrained``, or a hub model name. The
    tokenizer pads on the left and has a PAD token distinct from EOS.
    """
    device = torch.device(device) if device is not None else get_device()
    path = resolve_model_name(name_or_path)
    if name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        path = cached_artifact(artifact_name(name_or_path, preset),
                               lambda d: build_base_model(preset, d, device, progress, name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        if name_or_path in PRESETS:
            raise ValueError(
                f"the cached base LM {name_or_path!r} at {path} does not load ({e}). Delete that folder to rebuild it."
            ) from None
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
