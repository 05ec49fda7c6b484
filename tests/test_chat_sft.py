"""Chat prompts (messages, pre-formatted strings), every stop id, SFT on real architectures, one missing_eos_score."""

import copy
import json

import pytest
import torch

from rlhf_book import SFTConfig, SFTTrainer, load_base_model
from rlhf_book.a2c import A2CConfig
from rlhf_book.critic_free import CriticFreeConfig
from rlhf_book.dpo import encode_pairs
from rlhf_book.gold import gold_reward_fn
from rlhf_book.ppo import PPOConfig
from rlhf_book.preferences import validate_record
from rlhf_book.reward_model import reward_model_from_lm, reward_scores
from rlhf_book.rollout import (decode_responses, encode_prompts, generate, prompt_texts, score_rollout, stop_token_ids,
                               teacher_forcing_batch)
from rlhf_book.sft import completion_nll, load_sft_records, sft_example, validate_sft_records
from rlhf_book.testing import save_tiny_model, tiny_tokenizer
from rlhf_book.tokenizer import format_prompt, format_prompts, is_formatted
from rlhf_book.trainer import OnPolicyConfig

CHAT = [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_chat")
    return {arch: save_tiny_model(root / arch, arch) for arch in ("llama", "qwen3", "gpt_neox")}


def _load(tiny_dirs, arch="llama"):
    torch.manual_seed(0)
    return load_base_model(str(tiny_dirs[arch]), device="cpu", progress=False)


def _template_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return list(out["input_ids"])


# ------------------------------------------------------------------ chat prompts
def test_messages_with_a_system_turn_are_formatted_by_the_chat_template(tiny_dirs):
    _, tok = _load(tiny_dirs)
    ids, mask = encode_prompts(tok, [CHAT, "Weather in Oslo?"])
    got = ids[0][mask[0].bool()].tolist()
    assert got == _template_ids(tok, CHAT)
    assert format_prompt(CHAT, tok).startswith("<|im_start|>system\nYou are a weather bot.<|im_end|>")
    # a string is one user turn, as before
    assert ids[1][mask[1].bool()].tolist() == _template_ids(tok, CHAT[1:])
    # records in TRL's conversational format, and tuples of messages
    assert prompt_texts([{"prompt": CHAT}, tuple(CHAT)]) == [CHAT, CHAT]


def test_a_preformatted_string_is_not_wrapped_twice(tiny_dirs):
    _, tok = _load(tiny_dirs)
    formatted = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert is_formatted(formatted, tok) and not is_formatted("Weather in Oslo?", tok)
    assert format_prompt(formatted, tok) == formatted
    a, _ = encode_prompts(tok, [formatted])
    b, _ = encode_prompts(tok, [CHAT])
    assert a.tolist() == b.tolist()
    assert format_prompt(formatted, tok).count("<|im_start|>") == 3  # system, user, assistant: once each
    no_generation_prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]: .*already formatted.*generation prompt"):
        format_prompts(["ok", no_generation_prompt], tok)


def test_bad_prompts_name_the_prompt_and_field(tiny_dirs):
    _, tok = _load(tiny_dirs)
    plain = tiny_tokenizer(chat=False)
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt is a list of messages, but the tokenizer has no chat "
                                         r"template"):
        format_prompts(["fine", CHAT], plain)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[1\]: missing field 'content'"):
        prompt_texts([[CHAT[0], {"role": "user"}]])
    with pytest.raises(ValueError, match=r"prompts\[2\]\[0\]: field 'content' must be a string, got int"):
        prompt_texts(["a", "b", [{"role": "user", "content": 3}]])
    with pytest.raises(ValueError, match=r"prompts\[0\]: missing field 'prompt'.*pass \[messages\]"):
        generate(_load(tiny_dirs)[0], tok, CHAT, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty string or a non-empty list"):
        prompt_texts(["a", []])
    with pytest.raises(ValueError, match=r"line 4: field 'prompt'\[0\]: missing field 'role'"):
        validate_record({"prompt": [{"content": "x"}], "chosen": "a", "rejected": "b"}, "line 4")


def test_reward_functions_and_models_get_the_prompt_as_given(tiny_dirs):
    model, tok = _load(tiny_dirs)
    seen = []

    def reward_fn(prompts, responses, terminated):
        seen.extend(prompts)
        return gold_reward_fn(prompts, responses, terminated)  # the book's gold reads a conversation's user turn

    ro = generate(model, tok, [{"prompt": CHAT}, "Weather in Oslo?"], max_new_tokens=4, greedy=True)
    assert ro.prompts == [CHAT, "Weather in Oslo?"]
    score_rollout(reward_fn, ro)
    assert seen == [CHAT, "Weather in Oslo?"]
    rm = reward_model_from_lm(model)
    a, b = reward_scores(rm, tok, [CHAT, tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)],
                         ["Sunny.", "Sunny."], normalize=False)
    assert a == b  # messages and their pre-formatted string are the same input to a reward model


# ------------------------------------------------------------------ stop tokens
def test_generation_stops_at_every_configured_end_id(tiny_dirs):
    model, tok = _load(tiny_dirs)
    ends = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert stop_token_ids(model, tok) == ends
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    for end in ends:
        with torch.no_grad():
            head.bias.zero_()
            head.bias[end] = 1e4
        ro = generate(model, tok, ["Weather in Oslo?", CHAT], max_new_tokens=6, greedy=True)
        assert ro.response_ids[:, 0].tolist() == [end, end]
        assert ro.terminated.tolist() == [True, True] and ro.response_lengths.tolist() == [1, 1]
        assert ro.responses == ["", ""]  # the end token is stripped from the text
    # an end id in the middle of a reply: stripped too, whichever it is
    word = tok("sunny", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([word + [ends[1]]])
    assert decode_responses(tok, ids, torch.ones_like(ids), stop_token_ids(model, tok)) == ["sunny"]


def test_teacher_forced_replies_end_with_the_sampled_end_token(tiny_dirs):
    _, tok = _load(tiny_dirs)
    im_end, eot = (tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    pair = {"prompt": CHAT, "chosen": "Sunny.", "rejected": "Rain.", "chosen_eos": "<|endoftext|>"}
    batch = encode_pairs(tok, [validate_record(pair, "record 0", tok)])
    last = batch.response_ids.gather(1, (batch.response_lengths - 1)[:, None]).squeeze(1)
    assert last.tolist() == [eot, im_end]
    with pytest.raises(ValueError, match=r"record 0: field 'chosen_eos': '<\|nope\|>' is not a token"):
        validate_record({**pair, "chosen_eos": "<|nope|>"}, "record 0", tok)


def test_generated_pairs_record_a_non_default_end_token(tiny_dirs):
    from rlhf_book.preferences import generate_preferences

    model, tok = _load(tiny_dirs)
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        head.bias[eot] = 4.0  # replies often end with the generation config's second end id

    class Longer:
        def prefers_first(self, prompt, a, b, a_terminated=True, b_terminated=True):
            return len(a) > len(b)

    recs = generate_preferences(model, tok, ["Weather in Oslo?", CHAT], 12, Longer(), max_new_tokens=8, progress=False)
    ended = [r for r in recs if "chosen_eos" in r]
    assert ended and all(r["chosen_eos"] == "<|endoftext|>" and r["chosen_terminated"] for r in ended)
    batch = encode_pairs(tok, ended[:1])
    assert batch.response_ids[0, batch.response_lengths[0] - 1].item() == eot


# ------------------------------------------------------------------ SFT
def _records(n=16):
    places = ["Oslo", "Rome", "Lima", "Cairo"]
    words = ["sunny", "rainy", "windy", "cold"]
    out = []
    for i in range(n):
        p, w = places[i % 4], words[i % 4]
        if i % 3 == 0:
            out.append({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": f"Weather in {p}?"},
                                     {"role": "assistant", "content": f"It is {w} in {p}."}]})
        elif i % 3 == 1:
            out.append({"prompt": [{"role": "user", "content": f"Weather in {p}?"}],
                        "completion": [{"role": "assistant", "content": f"It is {w} in {p}."}]})
        else:
            out.append({"prompt": f"Weather in {p}?", "completion": f"It is {w} in {p}."})
    return out


def test_sft_loss_is_the_completion_only_nll(tiny_dirs):
    model, tok = _load(tiny_dirs)
    examples = [sft_example(r) for r in _records(3)]
    nll, n = completion_nll(model, teacher_forcing_batch(tok, [p for p, _ in examples], [c for _, c in examples]))
    for (prompt, completion), s, k in zip(examples, nll, n):
        p_ids = tok(format_prompt(prompt, tok), add_special_tokens=False)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        by_hand = -logp[torch.arange(len(p_ids) - 1, ids.size(1) - 1), torch.tensor(c_ids)].sum()
        assert int(k) == len(c_ids)
        torch.testing.assert_close(s, by_hand, atol=1e-4, rtol=1e-5)
    # a messages record: every turn before the last (assistant) one is the prompt, the last the completion
    assert sft_example(_records(1)[0])[0] == _records(1)[0]["messages"][:-1]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt_neox"])
def test_sft_lowers_the_completion_nll(tiny_dirs, arch):
    model, tok = _load(tiny_dirs, arch)
    records = _records()
    cfg = SFTConfig(batch_size=8, lr=3e-3, progress=False, eval_every=0, max_new_tokens=4, eval_samples=1)
    trainer = SFTTrainer(model, tok, cfg)
    history = trainer.train(records, epochs=3, eval_records=records, eval_prompts=[CHAT, "Weather in Rome?"])
    assert history[0]["step"] == 0 and history[-1]["step"] == 6 and history[-1]["epoch"] == 3.0
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    assert "eval_kl" not in history[-1] and history[-1]["eval_samples"][0]["prompt"] == CHAT


def test_sft_minibatches_resume_and_export(tiny_dirs, tmp_path):
    model, tok = _load(tiny_dirs)
    records = _records(8)
    base = dict(batch_size=4, lr=1e-3, progress=False, eval_every=0, checkpoint_every=1)
    whole = SFTTrainer(copy.deepcopy(model), tok, SFTConfig(**base))
    parts = SFTTrainer(copy.deepcopy(model), tok, SFTConfig(minibatch_size=3, **base), ref_model=copy.deepcopy(model))
    h1, h2 = whole.train(records, epochs=1), parts.train(records, epochs=1)
    assert abs(h1[-1]["loss"] - h2[-1]["loss"]) < 1e-5  # accumulation = one big batch
    for a, b in zip(whole.lm.parameters(), parts.lm.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # resume: 1 epoch then 2 more = 2 epochs at once (the same batches, bit for bit)
    straight = SFTTrainer(copy.deepcopy(model), tok, SFTConfig(**base)).train(records, epochs=2)
    SFTTrainer(copy.deepcopy(model), tok, SFTConfig(**base)).train(records, epochs=1, checkpoint_dir=tmp_path / "run")
    resumed = SFTTrainer(copy.deepcopy(model), tok, SFTConfig(**base)).train(records, epochs=2,
                                                                            checkpoint_dir=tmp_path / "run")
    assert [h["loss"] for h in resumed] == [h["loss"] for h in straight]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = whole.export(tmp_path / "export")
    again, tok2 = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == tok.chat_template
    ids = torch.tensor([_template_ids(tok, CHAT)])
    torch.testing.assert_close(again(ids).logits, whole.lm(ids).logits, atol=1e-5, rtol=1e-5)


def test_sft_records_errors_name_file_line_and_field(tiny_dirs, tmp_path):
    _, tok = _load(tiny_dirs)
    path = tmp_path / "sft.jsonl"
    good = json.dumps(_records(1)[0])
    cases = [
        ('{"prompt": "a"}', r"sft\.jsonl line 3: missing field 'completion'"),
        ('{"prompt": "a", "completion": ""}', r"line 3: field 'completion' is empty"),
        ('{"messages": [{"role": "user", "content": "a"}]}', r"line 3: field 'messages': the last message must be"),
        ('{"prompt": "a", "completion": [{"role": "user", "content": "b"}]}', r"line 3: field 'completion' must be "
                                                                            r"a string or a list of one assistant"),
        ('{"prompt": [{"role": "user"}], "completion": "b"}', r"line 3: field 'prompt'\[0\]: missing field 'content'"),
        ('{"prompt": "a", "completion": "b", "messages": []}', r"line 3: a record has either 'messages' or"),
        ('{"prompt": "a", "completion": ', r"line 3: not valid JSON"),
        ('[1]', r"line 3: expected a JSON object"),
    ]
    for line, message in cases:
        path.write_text(f"{good}\n\n{line}\n")
        with pytest.raises(ValueError, match=message):
            load_sft_records(path, tok)
    path.write_text(good + "\n" + json.dumps({"prompt": CHAT, "completion": "x"}) + "\n")
    assert len(load_sft_records(path, tok)) == 2
    with pytest.raises(ValueError, match=r"line 1: prompt is a list of messages, but the tokenizer has no chat"):
        load_sft_records(path, tiny_tokenizer(chat=False))
    with pytest.raises(ValueError, match=r"record 0: prompt \+ completion \+ EOS is \d+ tokens, longer than the "
                                         r"context window of 8"):
        validate_sft_records(_records(1), tok, max_length=8)
    with pytest.raises(ValueError, match=r"no such SFT file"):
        load_sft_records(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------ one missing_eos_score
def test_on_policy_trainers_share_the_missing_eos_score_default():
    default = OnPolicyConfig().missing_eos_score
    assert default == -1.0
    assert A2CConfig().missing_eos_score == PPOConfig().missing_eos_score == CriticFreeConfig().missing_eos_score == default
