"""The arithmetic world (chapter 9): generator, scratchpad, verifier, per-step checker, rewards, and its cached build."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rlhf_book
from rlhf_book import base_model as bm
from rlhf_book.cache import is_complete
from rlhf_book.rewards import check_scores, reward_fn_from_verifier
from rlhf_book.worlds import arithmetic as A
from rlhf_book.worlds import get_world, split_model_name, world_names

Q = "What is 347 + 285?"  # answer 632
REFERENCE = "7 + 5 = 12\n4 + 8 + 1 = 13\n3 + 2 + 1 = 6\n#### 632"


# ------------------------------------------------------------------ the generator
def test_the_generator_is_deterministic_and_seeds_differ():
    a, b = A.generate_problems(200, seed=3), A.generate_problems(200, seed=3)
    assert a == b and A.generate_problems(200, seed=4) != a
    assert A.generate_traces(50, seed=1) == A.generate_traces(50, seed=1)
    assert A.heldout_problems("add3", 30, seed=0) == A.heldout_problems("add3", 30, seed=0)


@pytest.mark.parametrize("name, op, lengths", [
    ("add1", "+", (1, 1)), ("add2", "+", (2, 2)), ("add3", "+", (3, 3)), ("add4", "+", (4, 4)),
    ("mul2", "*", (2, 1)), ("mul3", "*", (3, 1)),
])
def test_difficulty_sets_the_digits(name, op, lengths):
    for p in A.generate_problems(100, seed=0, difficulties=(name,)):
        assert p.ops == (op,) and tuple(len(str(x)) for x in p.numbers) == lengths and p.difficulty == name
        assert len(A.solve(p)[0]) == lengths[0]  # one column step per digit of the first operand


@pytest.mark.parametrize("name, terms", [("chain3", 3), ("chain5", 5)])
def test_chains_have_their_terms_and_go_negative(name, terms):
    problems = A.generate_problems(300, seed=0, difficulties=(name,))
    assert all(len(p.numbers) == terms and set(p.ops) <= {"+", "-"} for p in problems)
    assert any(p.answer < 0 for p in problems) and any(p.answer > 0 for p in problems)


def test_harder_difficulties_have_longer_scratchpads():
    mean_steps = {name: sum(len(A.solve(p)[0]) for p in A.generate_problems(100, 0, (name,))) / 100
                  for name in ("add1", "add2", "add3", "add4", "chain5")}
    assert mean_steps["add1"] < mean_steps["add2"] < mean_steps["add3"] < mean_steps["add4"] <= mean_steps["chain5"]


def test_held_out_problems_never_appear_in_training():
    train = {p.text for p in A.generate_problems(4000, seed=0)}
    held = {p.text for ps in A.heldout_sets(100).values() for p in ps}
    assert train and held and not train & held
    assert all(A.split_of(A.parse_problem(t["prompt"])) == "train" for t in A.generate_traces(500, seed=0))
    assert {A.parse_problem(p).text for p in A.prompts("eval", n=64)} <= held
    assert len(A.heldout_problems("add1", 200)) < 40  # a small difficulty has few held-out problems, all distinct
    assert len(A.heldout_problems("add3", 200)) == 200


def test_traces_hold_the_asked_share_of_wrong_ones():
    traces = A.generate_traces(400, seed=0, wrong_share=0.25)
    wrong = [t for t in traces if not t["correct"]]
    assert len(wrong) == 100
    for t in traces:
        problem = A.parse_problem(t["prompt"])
        assert A.verify(t["response"], problem.answer) is t["correct"]
        assert A.is_well_formed(t["response"])
        steps = A.check_steps(t["response"], problem)
        bad = [s for s in steps if not s.correct]
        assert len(bad) == (0 if t["correct"] else 1)  # a wrong trace has exactly one slipped step
    assert all(t["correct"] for t in A.generate_traces(100, seed=0, wrong_share=0.0))
    with pytest.raises(ValueError, match="wrong_share"):
        A.generate_traces(10, wrong_share=1.5)


def test_unknown_difficulty_is_named():
    with pytest.raises(ValueError, match="unknown difficulty 'add9'.*add1"):
        A.generate_problems(3, difficulties=("add9",))


# ------------------------------------------------------------------ the scratchpad and the prompt
def test_reference_scratchpad():
    assert A.reference_reply(A.parse_problem(Q)) == REFERENCE
    assert A.reference_reply(A.parse_problem("What is 47 * 6?")) == "7 * 6 = 42\n4 * 6 + 4 = 28\n#### 282"
    assert A.reference_reply(A.parse_problem("What is 3 - 8 + 4?")) == "3 - 8 = -5\n-5 + 4 = -1\n#### -1"
    assert A.reference_reply(A.parse_problem("What is 2 + 3 * 4?")) == "3 * 4 = 12\n2 + 12 = 14\n#### 14"


@pytest.mark.parametrize("prompt, answer", [
    (Q, 632), ("  What is 2 + 3 * 4?  ", 14), ("What is 3 - 8 + 4?", -1), ("Please. What is 12*3? Thanks", 36),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 9 - 12?"}], -3),
])
def test_the_answer_is_read_from_the_prompt(prompt, answer):
    assert A.parse_problem(prompt).answer == answer


@pytest.mark.parametrize("prompt", ["Review Luigi's.", "What is love?", "What is 3 +?", "", "What is " + "9" * 50 + " + 1?"])
def test_a_prompt_without_a_problem_is_refused(prompt):
    with pytest.raises(ValueError, match="holds no arithmetic problem"):
        A.parse_problem(prompt)


# ------------------------------------------------------------------ the verifier
BIG = "9" * A.MAX_DIGITS


@pytest.mark.parametrize("reply, strict, lenient", [
    (REFERENCE, 632, 632),
    ("#### 632", 632, 632),
    ("  7 + 5 = 12\n\t#### 632  \n\n", 632, 632),  # whitespace around lines and the reply
    ("7 + 5 = 12\r\n#### 632\r\n", 632, 632),  # Windows line ends
    ("632", None, 632),  # no answer line
    ("The answer is 632.", None, 632),
    ("", None, None),  # empty
    ("   \n \n", None, None),
    ("#### six hundred", None, None),  # non-numeric
    ("#### 632\n#### 633", None, 633),  # two answer lines
    ("#### 632\nI hope this helps", None, 632),  # the answer line is not the last
    ("####632", None, 632),
    ("####  632", None, 632),  # two spaces
    ("#### +632", None, 632),
    ("#### 0632", None, 632),  # leading zero
    ("#### 0", 0, 0),
    ("#### -0", None, 0),
    ("#### -7", -7, -7),  # negative numbers
    ("3 - 8 = -5\n#### -5", -5, -5),
    ("#### 632.0", None, 0),
    ("#### 1,234", None, 234),
    ("#### 632 633", None, 633),
    ("12 #### 632", None, 632),
    ("#### ٦٣٢", None, None),  # non-ASCII digits are not digits here
    (f"#### {BIG}", int(BIG), int(BIG)),  # the longest number that counts
    (f"#### {BIG}9", None, None),  # overflow: longer numbers are no answer
    ("#### " + "9" * 5000, None, None),  # beyond int()'s 4300-digit limit: still no exception
    ("1 2 3 " + "7" * 100, None, None),
])
def test_answer_extraction(reply, strict, lenient):
    assert A.extract_answer(reply, "strict") == strict
    assert A.extract_answer(reply, "lenient") == lenient
    assert A.is_well_formed(reply) is (strict is not None)


def test_strict_lenient_and_any_on_the_same_replies():
    listing = "\n".join(str(i) for i in range(700))  # the exploit of a sloppy verifier: print many numbers
    assert not A.verify(listing, 632) and not A.verify(listing, 632, "lenient") and A.verify(listing, 632, "any")
    assert A.verify("632 is it", 632, "lenient") and not A.verify("632 is it", 632)
    assert A.verify("#### 633\n632", 632, "lenient") and not A.verify("#### 633\n632", 632)
    assert A.verify(REFERENCE, 632, "any") and not A.verify("#### 631", 632, "any")


@pytest.mark.parametrize("call", [lambda: A.extract_answer("#### 1", "any"), lambda: A.verify("#### 1", 1, "loose"),
                                  lambda: A.extract_answer(None), lambda: A.verify(b"#### 1", 1, "any")])
def test_verifier_argument_errors(call):
    with pytest.raises(ValueError):
        call()


# ------------------------------------------------------------------ the per-step checker
def test_each_step_is_checked_on_its_own():
    problem = A.parse_problem(Q)
    reply = "7 + 5 = 12\n 4+8+1=14 \nso the sum is\n1 + 1 = 2\n\n#### 642"
    checks = A.check_steps(reply, problem)
    assert [(c.is_step, c.correct, c.on_path) for c in checks] == [
        (True, True, True), (True, False, False), (False, False, False), (True, True, False)]
    assert [reply[c.start:c.end] for c in checks] == [c.text for c in checks]  # spans locate each step
    assert [c.text for c in checks][1] == "4+8+1=14"
    assert all(c.correct and c.on_path for c in A.check_steps(REFERENCE, problem))
    assert [c.on_path for c in A.check_steps(REFERENCE)] == [None] * 3  # without a problem: arithmetic only


@pytest.mark.parametrize("line, is_step, correct", [
    ("-5 + 4 = -1", True, True), ("3 - 8 = -5", True, True), ("3 - 8 = 5", True, False), ("2 + 3 * 4 = 14", True, True),
    ("2 + 3 * 4 = 20", True, False), ("12", False, False), ("= 12", False, False), ("a + b = 3", False, False),
    ("7 + 5 = twelve", False, False), ("9" * 39 + " + 1 = 1" + "0" * 39, True, True),
    ("9" * 41 + " + 1 = 1", False, False), ("1 + 1 = " + "2" * 5000, False, False),
])
def test_step_hand_cases(line, is_step, correct):
    (check,) = A.check_steps(line + "\n#### 1")
    assert (check.is_step, check.correct) == (is_step, correct)


def test_no_steps_in_an_answer_only_or_empty_reply():
    assert A.check_steps("#### 632") == [] and A.check_steps("") == []


# ------------------------------------------------------------------ rewards
def test_rewards_are_scores_the_trainers_accept():
    prompts = [Q] * 6
    replies = [REFERENCE, "#### 632", "#### 631", "632", "\n".join(map(str, range(700))), "#### 632"]
    ended = torch.tensor([True, True, True, True, True, False])
    expected = {
        "strict": [1, 1, 0, 0, 0, 0],  # the last one was cut off before EOS
        "lenient": [1, 1, 0, 1, 0, 1],
        "any": [1, 1, 0, 1, 1, 1],
        "format": [1, 1, 1, 0, 0, 0],
    }
    for kind, want in expected.items():
        fn = A.reward_fn(kind=kind)
        out = fn(prompts, replies, ended)
        assert out.dtype == torch.float32 and out.shape == (6,) and out.tolist() == want, kind
        assert torch.equal(check_scores(out, 6), out)
    assert A.strict_reward(prompts[:1], [REFERENCE], None).tolist() == [1.0]  # terminated None: all ended
    assert A.strict_reward(prompts[:2], [REFERENCE] * 2, [True, False]).tolist() == [1.0, 0.0]
    assert A.make_reward_fn("strict", require_eos=False)([Q], ["#### 632"], [False]).tolist() == [1.0]
    messages = [{"role": "user", "content": Q}]
    assert A.strict_reward([messages], [REFERENCE], [True]).tolist() == [1.0]


def test_reward_errors_name_the_problem():
    with pytest.raises(ValueError, match="holds no arithmetic problem"):
        A.strict_reward(["Review Luigi's."], ["#### 1"], [True])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        A.strict_reward([Q, Q], ["#### 632"], [True])
    with pytest.raises(ValueError, match="mode must be one of"):
        A.make_reward_fn("exact")
    with pytest.raises(ValueError, match=r"row 1"):
        reward_fn_from_verifier(lambda p, r: float("nan") if r == "x" else 1.0)(["a", "b"], ["y", "x"])


# ------------------------------------------------------------------ the registry
def test_both_worlds_are_in_one_registry():
    assert world_names() == ["reviews", "arithmetic"]
    for name in world_names():
        w = get_world(name)
        assert w.name == name and w.presets and w.rewards and callable(w.build) and callable(w.load_policy)
        assert callable(w.prompts) and callable(w.reward_fn) and callable(w.gold_fn)
    arithmetic, reviews = get_world("arithmetic"), get_world("reviews")
    assert arithmetic.reward_fn("tiny") is A.strict_reward and arithmetic.gold_fn is A.strict_reward
    assert reviews.reward_fn("tiny", "gold") is rlhf_book.gold_reward_fn
    train, held = rlhf_book.prompt_split(0)
    assert reviews.prompts("train") == [p["prompt"] for p in train]
    assert reviews.prompts("eval") == [p["prompt"] for p in held]
    assert len(arithmetic.prompts("eval", n=16)) == 16 and len(arithmetic.prompts("train", n=10)) == 10
    with pytest.raises(ValueError, match="unknown world 'maths'; known: reviews, arithmetic"):
        get_world("maths")


@pytest.mark.parametrize("name, parts", [("arithmetic:tiny", ("arithmetic", "tiny")), ("reviews:cpu", ("reviews", "cpu")),
                                         ("cpu", None), ("gpt2", None), ("org/model", None), ("c:/models/x", None),
                                         ("foo:bar", None), (None, None)])
def test_world_model_names(name, parts):
    assert split_model_name(name) == parts


def test_a_world_model_name_with_an_unknown_preset_is_named():
    with pytest.raises(ValueError, match="no preset 'huge'; its presets: tiny, cpu"):
        split_model_name("arithmetic:huge")


def test_the_reviews_world_loads_the_same_policy_as_load_base_model(tiny_world, tiny_cache_dir, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))
    model, _ = get_world("reviews").load_policy("tiny", device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_world[0].state_dict().values()))


def test_the_reviews_world_builds_through_the_registry(tiny_artifacts, tiny_cache_dir, monkeypatch):
    monkeypatch.setenv("RLHF_BOOK_CACHE", str(tiny_cache_dir))
    paths = get_world("reviews").build("tiny", device="cpu", progress=False)  # cached: loads, builds nothing
    assert paths["base"] == tiny_artifacts["base"] and paths["reward_model"] == tiny_artifacts["rm"]
    assert all(is_complete(p) for p in paths.values())
    scores = get_world("reviews").reward_fn("tiny", device="cpu", progress=False)(["Review Luigi's."], ["Great."], [True])
    assert scores.shape == (1,)


# ------------------------------------------------------------------ the build: cached, reused, kill-safe
def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def tiny_reference(arithmetic_tiny):
    """The tiny arithmetic policy's weights, built without interruption (builds are deterministic)."""
    return _weights(arithmetic_tiny[0])


def test_the_build_is_cached_and_reused(tmp_cache, monkeypatch, tiny_reference):
    paths = A.build("tiny", device="cpu", progress=False)
    assert paths["policy"] == A.policy_path("tiny") and is_complete(paths["policy"])
    meta = json.loads((paths["policy"] / "COMPLETE.json").read_text())
    assert meta["parameters"] > 0 and meta["world_version"] == A.WORLD_VERSION
    monkeypatch.setattr(A, "train_base_model", lambda *a, **k: pytest.fail("the cached policy was built again"))
    assert A.build("tiny", device="cpu", progress=False) == paths  # the second call loads
    model, tok = get_world("arithmetic").load_policy("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(model), tiny_reference) and tok.padding_side == "left"
    assert [tok.decode([i]) for i in tok("12345")["input_ids"]] == list("12345")  # one token per digit
    assert A.policy_metadata("tiny")["history"]
    assert A.policy_key("tiny") != A.policy_key("cpu")
    other = A.ArithmeticPreset(A.PRESETS["tiny"].model, wrong_share=0.3)
    assert A.policy_key(other) != A.policy_key(A.PRESETS["tiny"], label="tiny")  # any recipe change: a new key


def test_preset_errors_are_named():
    with pytest.raises(ValueError, match="arithmetic preset must be one of 'tiny', 'cpu'"):
        A.load_policy("huge")
    with pytest.raises(ValueError, match="unknown difficulty 'add9'"):
        A.ArithmeticPreset(difficulties=("add9",))
    with pytest.raises(ValueError, match="wrong_share must be"):
        A.ArithmeticPreset(wrong_share=1.5)
    assert A.PRESETS["cpu"].difficulties == A.TRAINED


def test_a_build_killed_midway_resumes_to_the_same_policy(tmp_cache, monkeypatch, kill_after_first_checkpoint, tiny_reference):
    kill_after_first_checkpoint(bm, lambda: A.build("tiny", device="cpu", progress=False))
    key = A.policy_key("tiny")
    assert not (tmp_cache / key).exists()  # nothing a later run would load
    assert (tmp_cache / f".{key}.partial" / "train_state.pt").is_file()
    assert (tmp_cache / f".{key}.partial" / "tokenizer").is_dir()
    model, _ = A.load_policy("tiny", device="cpu", progress=False)
    assert torch.equal(_weights(model), tiny_reference)


def test_killed_after_saving_before_the_marker_does_not_retrain(tmp_cache, monkeypatch, kill_before_rename):
    with pytest.raises(KeyboardInterrupt):
        A.build("tiny", device="cpu", progress=False)
    kill_before_rename()  # undone: the next call may rename
    monkeypatch.setattr(A, "train_base_model", lambda *a, **k: pytest.fail("the finished policy was trained again"))
    assert is_complete(A.build("tiny", device="cpu", progress=False)["policy"])


_KILLED_BUILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import os
    os.environ["RLHF_BOOK_CACHE"] = sys.argv[1]
    import rlhf_book
    import torch
    torch.set_num_threads(int(sys.argv[3]))  # the parent's: the same arithmetic, so the same weights
    from rlhf_book import base_model as bm
    from rlhf_book.worlds import arithmetic as A
    real = bm.save_checkpoint
    def save_then_hang(path, **state):
        real(path, **state)
        Path(sys.argv[2]).write_text("saved")
        time.sleep(120)
    bm.save_checkpoint = save_then_hang
    A.build("tiny", device="cpu", progress=False)
    """
)


def test_a_sigkilled_build_leaves_no_cache_that_blocks_the_next_run(tmp_cache, tiny_reference):
    flag = tmp_cache.parent / "saved"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_cache), str(flag),
                             str(torch.get_num_threads())])
    try:
        for _ in range(1200):
            if flag.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert flag.exists(), "the build never reached its first checkpoint"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    key = A.policy_key("tiny")
    assert not (tmp_cache / key).exists() and (tmp_cache / f".{key}.partial").is_dir()
    model, _ = A.load_policy("tiny", device="cpu", progress=False)  # takes the dead process's lock, resumes
    assert torch.equal(_weights(model), tiny_reference)


# ------------------------------------------------------------------ RL on the world: GRPO raises accuracy
# A policy that has learned single-digit addition from traces (20% of them wrong) gets about three replies in four
# right when sampled at temperature 1; 20 GRPO iterations on the strict 0/1 reward (8 prompts x 8 replies, beta = 0,
# lr 1e-3) raise that to about 0.82 (0.81-0.84 over trainer seeds 0-2). The claim can fail: at lr 3e-3 the same run
# collapses (0.75 -> 0.28). Measured on the RL prompts' problems, 8 samples each (680 replies, s.e. ~0.016).
SMALL = A.ArithmeticPreset(bm.Preset(n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=320, steps=500,
                                     batch_size=32, lr=5e-3, warmup=10, eval_every=250, checkpoint_every=250),
                           difficulties=("add1",))


def test_grpo_on_the_strict_reward_raises_accuracy(tmp_cache):
    import copy

    from rlhf_book.critic_free import CriticFreeConfig, CriticFreeTrainer

    policy, tok = A.load_policy(SMALL, device="cpu", progress=False)
    train = sorted({p.prompt for p in A.generate_problems(400, seed=0, difficulties=("add1",))})

    def accuracy(model):
        return A.accuracy(model, tok, train, greedy=False, samples=8, max_new_tokens=16, seed=1)

    before = accuracy(policy)
    config = CriticFreeConfig(advantage="grpo", batch_size=8, num_generations=8, max_new_tokens=16, lr=1e-3,
                              kl_coef=0.0, eval_every=0, progress=False, seed=0)
    trainer = CriticFreeTrainer(policy, copy.deepcopy(policy), tok, A.strict_reward, config)
    history = trainer.train(train, 20)
    after = accuracy(policy)
    assert 0.6 < before < 0.9, before  # the base policy leaves room
    assert after > before + 0.04, (before, after)
    assert all(0.0 <= h["proxy_reward"] <= 1.0 for h in history if "proxy_reward" in h)


# ------------------------------------------------------------------ the command line
def test_the_grpo_config_trains_on_the_arithmetic_world(tmp_cache, tmp_path, capsys):
    from pathlib import Path

    from rlhf_book.cli import load_config, main

    config = Path(__file__).resolve().parents[1] / "configs" / "grpo_arithmetic_tiny.toml"
    tables = load_config(config)
    assert tables["model"]["path"] == "arithmetic:tiny"
    out = tmp_path / "run"
    code = main(["train", "grpo", "--config", str(config), "--out", str(out), "--iterations", "2", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 2 and 0.0 <= summary["eval_gold_reward_end"] <= 1.0
    assert summary["eval_proxy_reward_end"] == summary["eval_gold_reward_end"]  # source and gold: the strict reward
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(A.parse_problem(s["prompt"]).difficulty is None for s in samples)
    held = {p.prompt for ps in A.heldout_sets(16).values() for p in ps}
    assert {s["prompt"] for s in samples} <= held  # evaluated on held-out problems
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (out / "policy" / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    ('source = "model"', "the arithmetic world has no reward model"),
    ('path = "arithmetic:huge"', "no preset 'huge'"),
])
def test_the_command_line_names_a_wrong_world_setting(tmp_path, capsys, change, message):
    from pathlib import Path

    from rlhf_book.cli import main

    text = (Path(__file__).resolve().parents[1] / "configs" / "grpo_arithmetic_tiny.toml").read_text()
    key = change.split(" = ")[0]
    lines = [change if line.startswith(f"{key} = ") else line for line in text.splitlines()]
    bad = tmp_path / "bad.toml"
    bad.write_text("\n".join(lines))
    assert main(["train", "grpo", "--config", str(bad), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
