"""CPU benchmark: how much does the library's shared prefill save in group sampling (GRPO / RLOO)?

    python benchmarks/run_cpu_group_prefill.py     # a few minutes on 2 cores

A critic-free trainer samples K replies per prompt. Before this change ``CriticFreeTrainer.step``
repeated each of its B prompts K times and called ``rlhf_book.rollout.generate`` on the B * K
texts: every copy of a prompt was tokenized and prefilled on its own, so the first forward
processed B * K * P prompt tokens to build B * K identical KV caches per prompt. The library
now shares the prefill: ``generate(..., samples_per_prompt=K)`` (and ``generate_from_ids``)
tokenizes and prefills the B prompts once, repeats the KV cache, the last logits and the masks
K times (``rollout._repeat_cache``: ``DynamicCache.batch_repeat_interleave`` for transformers'
caches) and decodes the B * K rows (rows i*K .. i*K + K - 1 answer prompt i);
``CriticFreeTrainer`` samples this way (its ``samples_per_prompt`` = ``num_generations``) and
so does ``critic_free.evaluate_pass_at_k``. The decode steps are the same work either way:
every row still attends over its own copy of the prompt's keys and values, so only the
prefill and the tokenization get cheaper, by up to (K - 1) / K of them, less the repeat.

The two variants, both the library's ``generate`` (nothing copied into this script):

- **repeated**: ``generate`` on the B * K repeated texts with ``samples_per_prompt=1`` (what
  the trainer did before);
- **shared**: ``generate`` on the B texts with ``samples_per_prompt=K`` (what it does now).

Both run in this process (the shared setup's policy: ``common.build_artifacts``, random-init
GPT-2, 4 layers, width 256, fp32), alternating A B B A ... so both see the same load, with
sampling on ``--threads`` intra-op threads (default 1, the trainer's ``generation_threads``),
B = 4 prompts per call, 24 new tokens, temperature 1. Points: K in ``--ks`` (default 4 and 16)
x prompt length in ``--lengths``: ``corpus`` (the benchmark's own prompts, ~10-16 tokens) and
long prompts of about 64 and 128 tokens (each the concatenation of consecutive corpus prompts
until it reaches that many tokens, so rows differ a little and are left-padded as usual). Each
repetition uses the next 4 prompts and a generator seeded afresh, the same for both variants,
so both sample from the same random numbers.

Checks (every point): under the same seed the two variants return the same rollout: the same
prompt ids, mask and texts, the same response tokens, mask, texts and terminations, and
log-probs allclose (``torch.allclose``, atol 1e-5, rtol 1e-5: the same matmuls on B vs B * K
rows may round differently), on the first 4 prompts before timing and again on every timed
pair of calls. Reported per point: median wall seconds per call of each variant, the ratio
shared / repeated and the seconds saved, and what explains the saving, timed apart in every
repetition: the prefill alone (the first forward) on the B * K repeated rows and on the B
rows, each on the sampling thread(s) and on the process's 2 intra-op threads, the repeat of a
B-row cache and logits K times, and the tokenization of the B * K and of the B texts; their
difference predicts the saving. Writes benchmarks/results/cpu_group_prefill.json and .md
(``--out``), with the verdict.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

os.environ.update(common.THREAD_ENV)  # before torch loads
import torch

import rlhf_book
from rlhf_book.rollout import (
    _repeat_cache,
    _step_with_cache,
    encode_prompts,
    generate,
    logits_to_keep_kwargs,
    position_ids_from_mask,
)
from rlhf_book.runtime import intra_op_threads

N_PROMPTS = 4  # B: distinct prompts per call (the GRPO / RLOO benchmark's 4 per iteration)
PAYS = 0.95  # shared / repeated below this at a point: sharing saves at least 5% of the sampling time there
ATOL = RTOL = 1e-5


def long_prompts(tok, prompts: list[str], target: int) -> list[str]:
    """Prompt j: corpus prompts j, j+1, ... joined by spaces until the formatted text has >= ``target`` tokens."""
    out = []
    for j in range(len(prompts)):
        parts, i = [], j
        while True:
            parts.append(prompts[i % len(prompts)])
            text = " ".join(parts)
            if len(tok(text + "\n")["input_ids"]) >= target:
                break
            i += 1
        out.append(text)
    return out


def timed(fn, *args, **kwargs) -> float:
    """Seconds of one call ``fn(*args, **kwargs)``."""
    t = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t


def compare(rep, sh) -> dict:
    """Are two rollouts of the same prompts under the same seed the same? (tokens exactly, log-probs allclose)"""
    same_shape = sh.response_ids.shape == rep.response_ids.shape
    tokens = bool(same_shape and torch.equal(sh.response_ids, rep.response_ids)
                  and torch.equal(sh.response_mask, rep.response_mask) and torch.equal(sh.terminated, rep.terminated))
    return {
        "prompts_identical": bool(torch.equal(sh.prompt_ids, rep.prompt_ids) and torch.equal(sh.prompt_mask, rep.prompt_mask)
                                  and sh.prompts == rep.prompts),
        "tokens_identical": tokens,
        "responses_identical": sh.responses == rep.responses,
        "logprobs_allclose": bool(tokens and torch.allclose(sh.logprobs, rep.logprobs, atol=ATOL, rtol=RTOL)),
        "logprobs_max_abs_diff": float((sh.logprobs - rep.logprobs).abs().max()) if same_shape else None,
    }


def all_ok(c: dict) -> bool:
    return all(c[key] for key in ("prompts_identical", "tokens_identical", "responses_identical", "logprobs_allclose"))


@torch.no_grad()
def run_point(model, tok, texts: list[str], k: int, R: int, reps: int, threads: int, seed: int) -> dict:
    """Checks, then ``reps`` timed calls of each variant alternating (A B B A ...) after one warm-up each."""
    T = common.SETUP["temperature"]
    chunks = [texts[i : i + N_PROMPTS] for i in range(0, len(texts) - N_PROMPTS + 1, N_PROMPTS)]
    g = lambda s: torch.Generator().manual_seed(s)

    def repeated(c):
        return [t for t in c for _ in range(k)]

    calls = {  # A = what the trainer did (the B*K repeated texts), B = what it does now (one prefill per prompt)
        "repeated": lambda c, s: generate(model, tok, repeated(c), R, T, generator=g(s), threads=threads),
        "shared": lambda c, s: generate(model, tok, c, R, T, generator=g(s), threads=threads, samples_per_prompt=k),
    }
    # --- checks on the first chunk (also the warm-up)
    first = {n: f(chunks[0], seed) for n, f in calls.items()}
    checks = compare(first["repeated"], first["shared"])

    wall = {n: [] for n in calls}
    per_call_checks = []
    pre = {"bk_1": [], "bk_n": [], "b_1": [], "b_n": []}
    expand, enc_bk, enc_b, cols = [], [], [], []
    kw = logits_to_keep_kwargs(model, 1)

    def prefill(ids, mask):
        return _step_with_cache(model, None, input_ids=ids, attention_mask=mask,
                                position_ids=position_ids_from_mask(mask), **kw)

    def repeat(logits, past, ids, mask):  # what generate_from_ids does after the B-row prefill
        return (logits.repeat_interleave(k, dim=0), _repeat_cache(past, k),
                ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0))

    for rep in range(reps):
        c, s = chunks[rep % len(chunks)], seed + rep
        order = ("repeated", "shared") if rep % 2 == 0 else ("shared", "repeated")  # A B B A ...
        out = {}
        for n in order:
            t = time.perf_counter()
            out[n] = calls[n](c, s)
            wall[n].append(time.perf_counter() - t)
        per_call_checks.append(compare(out["repeated"], out["shared"]))
        # where the saving comes from, each part timed by itself: tokenization, prefill on B*K vs B rows
        # (on the sampling threads, and on the process's: would a 2-thread prefill be another fix?), the repeat
        enc_bk.append(timed(encode_prompts, tok, repeated(c)))
        enc_b.append(timed(encode_prompts, tok, c))
        ra, ma = encode_prompts(tok, repeated(c))
        rb, mb = encode_prompts(tok, c)
        cols.append(int(ra.shape[1]))
        with intra_op_threads(threads):
            pre["bk_1"].append(timed(prefill, ra, ma))
            t = time.perf_counter()
            logits, past = prefill(rb, mb)
            pre["b_1"].append(time.perf_counter() - t)
            expand.append(timed(repeat, logits, past, rb, mb))
        pre["bk_n"].append(timed(prefill, ra, ma))
        pre["b_n"].append(timed(prefill, rb, mb))
    med = common.median
    a, b = med(wall["repeated"]), med(wall["shared"])
    p = {key: med(v) for key, v in pre.items()}
    e_bk, e_b, ex = med(enc_bk), med(enc_b), med(expand)
    predicted = (p["bk_1"] - p["b_1"] - ex) + (e_bk - e_b)
    checks["timed_calls_ok"] = sum(all_ok(x) for x in per_call_checks)
    checks["timed_calls"] = len(per_call_checks)
    diffs = [x["logprobs_max_abs_diff"] for x in per_call_checks if x["logprobs_max_abs_diff"] is not None]
    checks["timed_calls_logprobs_max_abs_diff"] = max(diffs) if diffs else None
    return {
        "k": k, "rows": N_PROMPTS * k, "prompt_columns_median": med(cols), "prompt_columns": [min(cols), max(cols)],
        "repeated_s": round(a, 5), "shared_s": round(b, 5), "ratio_shared_over_repeated": round(b / a, 3),
        "saved_s": round(a - b, 5), "saved_pct": round(100 * (a - b) / a, 1),
        "per_rep_ratio": [round(y / x, 3) for x, y in zip(wall["repeated"], wall["shared"])],
        "repeated_s_all": [round(x, 5) for x in wall["repeated"]], "shared_s_all": [round(x, 5) for x in wall["shared"]],
        "prefill_alone_s": {"bk_rows_sampling_threads": round(p["bk_1"], 5), "b_rows_sampling_threads": round(p["b_1"], 5),
                            "bk_rows_process_threads": round(p["bk_n"], 5), "b_rows_process_threads": round(p["b_n"], 5)},
        "process_threads": torch.get_num_threads(), "repeat_cache_s": round(ex, 5),
        "prefill_share_of_repeated": round(p["bk_1"] / a, 3),
        "encode_repeated_ms": round(1e3 * e_bk, 3), "encode_unique_ms": round(1e3 * e_b, 3),
        "predicted_saving_s": round(predicted, 5), "checks": checks,
    }


def write_markdown(res: dict, path: Path) -> None:
    S, pts = res["setup"], res["points"]
    lines = [
        "# CPU benchmark: the library's shared prefill across the K samples of a group",
        "",
        (f"Date: {res['date']}. Machine: {res['machine']['nproc']} CPUs ({res['machine']['cpu_model']}). Load average "
         f"at start / end: {res['loadavg_start']} / {res['loadavg_end']}. rlhf_book {res['versions']['rlhf_book']}, "
         f"torch {res['versions']['torch']}, transformers {res['versions']['transformers']}; the shared setup's policy "
         f"(GPT-2, {S['n_layer']} layers, width {S['n_embd']}, fp32), {N_PROMPTS} distinct prompts per call, "
         f"{res['new_tokens']} new tokens, temperature {S['temperature']}, sampling on {res['threads']} intra-op "
         f"thread(s) (the trainer's `generation_threads`), {res['reps']} timed calls per variant and point "
         f"(alternating A B B A, after a warm-up)."),
        "",
        f"Command: `{res['command']}`",
        "",
        ("**repeated** = what `CriticFreeTrainer` did before: `rollout.generate` on the B * K texts (each prompt "
         "repeated K times, `samples_per_prompt=1`: tokenized and prefilled K times). **shared** = what the library "
         "does now: `rollout.generate` on the B texts with `samples_per_prompt=K` (tokenized and prefilled once, the "
         "KV cache, last logits and masks repeated K times, then the same decode loop on B * K rows)."),
        "",
        ("| prompts | K | rows | prompt columns | repeated s/call | shared s/call | shared / repeated | saved s (%) | "
         "per call | prefill alone B*K / B rows, sampling threads | same, 2 threads | repeat s | "
         "tokenize B*K / B (ms) | predicted saving s |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pts:
        pa = p["prefill_alone_s"]
        lines.append(
            f"| {p['lengths']} | {p['k']} | {p['rows']} | {p['prompt_columns_median']:.0f} ({p['prompt_columns'][0]}-"
            f"{p['prompt_columns'][1]}) | {p['repeated_s']:.4f} | {p['shared_s']:.4f} | "
            f"**{p['ratio_shared_over_repeated']:.2f}** | {p['saved_s']:.4f} ({p['saved_pct']:.0f}%) | "
            f"{', '.join(f'{x:.2f}' for x in p['per_rep_ratio'])} | "
            f"{pa['bk_rows_sampling_threads']:.4f} / {pa['b_rows_sampling_threads']:.4f} | "
            f"{pa['bk_rows_process_threads']:.4f} / {pa['b_rows_process_threads']:.4f} | {p['repeat_cache_s']:.5f} | "
            f"{p['encode_repeated_ms']:.2f} / {p['encode_unique_ms']:.2f} | {p['predicted_saving_s']:.4f} |")
    lines += ["", "Checks (every point: the first 4 prompts before timing, then every timed pair; same seed):", ""]
    for p in pts:
        c = p["checks"]
        fmt = lambda x: "-" if x is None else format(x, ".1e")
        lines.append(
            f"- {p['lengths']}, K={p['k']}: prompts identical {c['prompts_identical']}, response tokens identical "
            f"{c['tokens_identical']}, texts identical {c['responses_identical']}, log-probs allclose "
            f"{c['logprobs_allclose']} (max |diff| {fmt(c['logprobs_max_abs_diff'])}); timed pairs all of these: "
            f"{c['timed_calls_ok']} / {c['timed_calls']} (max |diff| {fmt(c['timed_calls_logprobs_max_abs_diff'])}).")
    lines += ["", f"**Verdict.** {res['verdict']}", ""]
    lines += [("Notes: both variants are the library's `generate`; the parts are timed by themselves in every "
               "repetition, after the two calls. \"prefill alone\" is the first forward on the B * K repeated rows "
               "(what the repeated variant prefills) and on the B rows (what the shared one does), on the sampling "
               "thread(s) and on the process's 2 intra-op threads (`generation_threads=1` covers the prefill too); "
               "\"repeat\" is the copy of a B-row KV cache, logits and masks to B * K rows (`_repeat_cache`); "
               "\"predicted saving\" = (prefill B*K - prefill B - repeat) on the sampling threads + (tokenize B*K - "
               "tokenize B), to set against the measured \"saved\". The decode steps are the same work in both "
               "variants: each of the B * K rows attends over its own copy of the prompt's keys and values. "
               "\"prefill share\" (JSON: `prefill_share_of_repeated`) = the B*K-row prefill / the repeated s/call, "
               "of which sharing can save at most (K-1)/K. The machine is shared; the variants alternate within a "
               "point, so compare the ratios."), ""]
    path.write_text("\n".join(lines))


def label(p: dict) -> str:
    return "corpus prompts" if p["lengths"] == "corpus" else f"~{p['lengths']}-token prompts"


def verdict(points: list[dict]) -> str:
    def desc(p):
        return (f"{label(p)} (~{p['prompt_columns_median']:.0f} columns), K={p['k']}: "
                f"{'saves' if p['saved_s'] >= 0 else 'costs'} {abs(p['saved_s']):.4f} s of {p['repeated_s']:.4f} s "
                f"per call ({abs(p['saved_pct']):.0f}%, shared / repeated {p['ratio_shared_over_repeated']:.2f}; "
                f"predicted from the parts {p['predicted_saving_s']:.4f} s)")

    s = ["The library's shared prefill (`samples_per_prompt=K`) vs the repeated prompts: "
         + "; ".join(desc(p) for p in points) + "."]
    base = next((p for p in points if p["lengths"] == "corpus" and p["k"] == 4), None)
    if base is not None:
        s.append(f"At the GRPO / RLOO benchmark's own setting (corpus prompts, K=4, 16 rows) the B*K-row prefill is "
                 f"{100 * base['prefill_share_of_repeated']:.0f}% of a repeated call, and sharing it "
                 + ("saves >= 5%" if base["ratio_shared_over_repeated"] < PAYS else "saves less than 5%") + " there.")
    pays = [p for p in points if p["ratio_shared_over_repeated"] < PAYS]
    if pays:
        s.append("It saves >= 5% at: " + "; ".join(
            f"{label(p)}, K={p['k']} ({p['ratio_shared_over_repeated']:.2f})" for p in pays) + ".")
    else:
        s.append("It saves less than 5% at every point measured.")
    if not all(all_ok(p["checks"]) and p["checks"]["timed_calls_ok"] == p["checks"]["timed_calls"] for p in points):
        s.append("**A check failed (see above): the two variants do not return the same rollout; do not use these numbers.**")
    return " ".join(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--lengths", nargs="+", default=["corpus", "64", "128"],
                    help="'corpus' (the benchmark's prompts) and/or approximate prompt lengths in tokens")
    ap.add_argument("--reps", type=int, default=6, help="timed calls per variant and point")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads while sampling (the trainer's default: 1)")
    ap.add_argument("--new-tokens", type=int, default=common.SETUP["response_length"])
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_group_prefill.json"),
                    help="the JSON result (the .md next to it); point smoke runs elsewhere, e.g. /tmp/prefill.json")
    args = ap.parse_args()

    import transformers
    from transformers import GPT2LMHeadModel

    load_start, t0 = common.loadavg(), time.perf_counter()
    S = common.SETUP
    rlhf_book.configure_threads(S["threads"])
    art = common.build_artifacts()
    tok, prompts = common.load_tokenizer_and_prompts(art)
    model = GPT2LMHeadModel.from_pretrained(art / "policy", dtype=torch.float32).eval()
    points = []
    for length in args.lengths:
        texts = prompts if length == "corpus" else long_prompts(tok, prompts, int(length))
        for k in args.ks:
            p = run_point(model, tok, texts, k, args.new_tokens, args.reps, args.threads, S["seed"])
            p["lengths"] = length
            points.append(p)
            pa = p["prefill_alone_s"]
            print(f"{length:>6s} K={k:2d} rows={p['rows']:3d} P={p['prompt_columns_median']:.0f}: repeated "
                  f"{p['repeated_s']:.4f} s, shared {p['shared_s']:.4f} s, ratio {p['ratio_shared_over_repeated']:.3f} "
                  f"(prefill alone {pa['bk_rows_sampling_threads']:.4f} -> {pa['b_rows_sampling_threads']:.4f} s, "
                  f"predicted saving {p['predicted_saving_s']:.4f} s); checks {p['checks']}",
                  flush=True)
    res = {
        **common.run_header("cpu_group_prefill", load_start, t0),
        "setup": S, "threads": args.threads, "new_tokens": args.new_tokens, "reps": args.reps,
        "prompts_per_call": N_PROMPTS, "artifacts": str(art.relative_to(common.REPO)),
        "versions": {"rlhf_book": rlhf_book.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "points": points,
    }
    res["verdict"] = verdict(points)
    out = Path(args.out)
    common.write_json(out, res)
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['total_wall_s']:.0f} s)")
    print(res["verdict"])


if __name__ == "__main__":
    main()
