"""Your own model, end to end on a CPU in about a minute: a Llama-style checkpoint in bf16, chat prompts, SFT,
then LoRA GRPO against a reward you write, then DPO, then a merged export that plain transformers loads.

    python examples/own_model.py [--out runs/own_model]

A real run starts from your checkpoint directory (``load_base_model("path/to/Qwen2.5-0.5B-Instruct",
dtype="bfloat16")``); here a tiny random-weight Llama with a ChatML template stands in for it, built locally by
``rlhf_book.testing.save_tiny_model`` (no model hub). Its replies are gibberish: the point is that every stage runs
on the architecture you bring, and that the numbers move the way each stage says.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import rlhf_book  # first: it sets OMP_WAIT_POLICY before torch loads
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_book.testing import save_tiny_model

SYSTEM = {"role": "system", "content": "You answer about the weather."}
CITIES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Riga", "Tunis", "Hanoi"]


def chat(city: str) -> list[dict]:
    """A chat prompt: a system turn and a user turn (the tokenizer's chat template formats it)."""
    return [SYSTEM, {"role": "user", "content": f"Weather in {city}?"}]


def sunny_reward(prompts, responses, terminated):
    """The reward we optimise: +1 per "sun" in the reply, -1 for a reply that never ended."""
    return [r.lower().count("sun") - (not t) for r, t in zip(responses, terminated)]


def main(out: Path) -> dict:
    rlhf_book.set_seed(0)
    path = save_tiny_model(out / "base", "llama", dtype=torch.bfloat16, hidden=64, layers=2)  # stand-in checkpoint

    # 1. load it as the checkpoint stores it (bf16); trainable weights are held in fp32 by the trainers
    policy, tok = rlhf_book.load_base_model(str(path), device="cpu", dtype="bfloat16")

    # 2. SFT on prompt/completion records (TRL's format; prompts may be chat messages), loss on the completion only
    sft_records = [{"prompt": chat(c), "completion": f"It is {w} in {c}."} for c in CITIES for w in ("sunny", "rainy")]
    sft = rlhf_book.SFTTrainer(policy, tok, rlhf_book.SFTConfig(batch_size=8, lr=3e-3, progress=False,
                                                                 eval_every=0))
    sft_history = sft.train(sft_records, epochs=15, eval_records=sft_records)

    # 3. LoRA on the SFT model; GRPO's reference is the same model with the adapter disabled (no second copy)
    lora = get_peft_model(policy, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.0))
    grpo = rlhf_book.CriticFreeTrainer(
        lora, None, tok, sunny_reward, rlhf_book.CriticFreeConfig(
            advantage="grpo", num_generations=4, batch_size=4, max_new_tokens=24, lr=5e-3, progress=False,
            eval_every=0, seed=0))
    grpo_history = grpo.train([chat(c) for c in CITIES], iterations=12, eval_prompts=[chat(c) for c in CITIES])

    # 4. DPO from preference records in TRL's format (the same LoRA policy, its reference again the adapter off)
    pairs = [{"prompt": chat(c), "chosen": f"Sunny in {c}.", "rejected": f"Rain in {c}."} for c in CITIES]
    dpo = rlhf_book.DPOTrainer(lora, None, tok, config=rlhf_book.DPOConfig(beta=0.1, batch_size=8, lr=5e-3,
                                                                           progress=False, eval_every=0))
    dpo_history = dpo.train(pairs, epochs=4, eval_pairs=pairs)

    # 5. export: the adapter merged into a copy, loadable by plain transformers (and the adapter alone)
    export = dpo.export(out / "policy", save_adapter=True)
    plain = AutoModelForCausalLM.from_pretrained(export)
    plain_tok = AutoTokenizer.from_pretrained(export)
    ids = plain_tok.apply_chat_template(chat("Oslo"), add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    with torch.no_grad():
        same = torch.allclose(plain(**ids).logits.float(), lora(**ids).logits.float(), atol=1e-2)
    summary = {
        "sft_val_loss": [sft_history[0]["val_loss"], sft_history[-1]["val_loss"]],
        "grpo_eval_reward": [grpo_history[0]["eval_proxy_reward"], grpo_history[-1]["eval_proxy_reward"]],
        "dpo_val_accuracy": [dpo_history[0]["val_accuracy"], dpo_history[-1]["val_accuracy"]],
        "export_same_logits": same,
        "export": str(export),
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/own_model", type=Path)
    main(parser.parse_args().out)
