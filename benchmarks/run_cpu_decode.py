"""CPU benchmark: decode speed of the library's sampling engines vs transformers' ``generate``, beside the FLOP floor.

    python benchmarks/run_cpu_decode.py --rounds 2          # ~3 min on 2 cores (compile included)

The shape is the speed issue's (``common.SETUP``): the random-init GPT-2 policy of
``common.build_artifacts`` (4 layers x 256, 4 heads, vocab 1024, fp32), batches of 16 of the
benchmark's prompts (~10-16 tokens, left-padded), 24 new tokens, temperature 1, top-k/top-p
off, 2 intra-op threads. Variants, each a full sampling call (prefill + decode):

- **plain**: ``rlhf_book.rollout.generate(..., engine="plain")``: the library's reference loop
  (a ``DynamicCache`` grown by ``torch.cat`` each step, the model building its mask each step);
- **static**: ``engine="static"``: the engine (``rlhf_book.engine``): a preallocated static KV
  cache read through views of the slots written so far, a ready 4-D mask, sampling by the
  exponential trick (the same random numbers as ``torch.multinomial``);
- **static+compile**: ``engine="static", compile=True``: the same with the decode step
  (forward of one token + sampling + log-prob) under ``torch.compile`` (inductor, CPU), over
  all slots of a cache rounded up to 64 (static shapes); its compile time is reported apart;
- **hf_dynamic** / **hf_static**: ``model.generate(do_sample=True, top_k=0, ...)`` with the
  default dynamic cache / ``cache_implementation="static"`` (transformers compiles the static
  cache's forward on GPUs only; here it runs eager, ``disable_compile=True``).

Every variant samples every batch with a generator seeded afresh (the same seed for all); the
library's plain and static engines must return identical tokens and log-probs (checked, bit
for bit), static+compile identical tokens (log-probs within 1e-5: its attention runs over the
masked slots too). transformers' generate samples from its own random stream (different tokens).

Timing: ``--rounds`` rounds, each calling every variant on the 4 batches in an order that
alternates (A B C D E, then E D C B A) so all see the same load; per variant the median wall
and process-CPU seconds per call, the decode part (call minus a prefill timed alone in the same
rounds), generated tokens/s of the decode part, and the FLOP floor: 2 x (non-embedding
parameters + LM head) per token + 4 x width x attended length per token and layer (QK^T and
AV), divided by the peak FLOP/s of this CPU as measured in the same run by a 2048 x 2048 fp32
matmul on the same 2 threads. Writes benchmarks/results/cpu_decode.json and .md (``--out``).
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

import rlhf_book  # noqa: F401
from rlhf_book.rollout import encode_prompts, generate, logits_to_keep_kwargs, position_ids_from_mask

B, R = common.SETUP["batch_size"], common.SETUP["response_length"]
T = common.SETUP["temperature"]
VARIANTS = ("plain", "static", "static+compile", "hf_dynamic", "hf_static")


def peak_flops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the best of ``reps`` n x n fp32 matmuls on ``threads`` threads: the peak we compare against."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops(cfg, prompt_lens: list[int], P: int, columns: int) -> dict:
    """Matmul FLOPs of the prefill (B rows x P columns, padded as computed) and of ``columns`` decode steps."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    per_token = 2 * (L * 12 * d * d)  # qkv (3 d^2) + out proj (d^2) + MLP (8 d^2), 2 FLOPs per multiply-add
    rows = len(prompt_lens)
    prefill = rows * P * per_token + rows * 2 * d * V + rows * L * 4 * d * P * P / 2  # + LM head on the last column
    decode = 0.0
    for t in range(columns - 1):  # token t + 1 comes from forwarding token t (P + t + 1 slots seen) and the LM head;
        decode += rows * (per_token + 2 * d * V + L * 4 * d * (P + t + 1))  # the first came from the prefill
    return {"prefill_flop": prefill, "decode_flop": decode, "per_token_flop": per_token + 2 * d * V}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=common.SETUP["threads"])
    ap.add_argument("--no-compile", action="store_true", help="skip the static+compile variant")
    ap.add_argument("--out", default=str(common.RESULTS / "cpu_decode"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    load_start = common.loadavg()
    snap_start = common.load_snapshot()
    from transformers import AutoModelForCausalLM

    art = common.build_artifacts()
    tok, prompts = common.load_tokenizer_and_prompts(art)
    model = AutoModelForCausalLM.from_pretrained(art / "policy").eval()
    torch.set_num_threads(args.threads)
    batches = [prompts[i : i + B] for i in range(0, len(prompts) - B + 1, B)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    variants = [v for v in VARIANTS if not (args.no_compile and v == "static+compile")]

    def ours(engine, compile=False):
        return lambda c, s: generate(model, tok, c, R, T, generator=torch.Generator().manual_seed(s),
                                     threads=args.threads, engine=engine, compile=compile)

    def hf(cache):
        def call(c, s):
            ids, mask = encode_prompts(tok, c)
            torch.manual_seed(s)
            kw = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=T,
                                 max_new_tokens=R, pad_token_id=pad, eos_token_id=eos, **kw)
            return out[:, ids.size(1):]
        return call

    calls = {"plain": ours("plain"), "static": ours("static"), "static+compile": ours("static", True),
             "hf_dynamic": hf("dynamic"), "hf_static": hf("static")}

    @torch.no_grad()
    def prefill(c):
        ids, mask = encode_prompts(tok, c)
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
              **logits_to_keep_kwargs(model, 1))

    # --- warm-up (compile), and the checks on every batch
    compile_s = None
    checks = {"plain_vs_static_bit_identical": True, "plain_vs_compiled_tokens_identical": True,
              "plain_vs_compiled_logprob_max_abs_diff": 0.0}
    for v in variants:
        t = time.perf_counter()
        calls[v](batches[0], 0)
        if v == "static+compile":
            compile_s = round(time.perf_counter() - t, 1)
    for i, c in enumerate(batches):
        a, b = calls["plain"](c, i), calls["static"](c, i)
        checks["plain_vs_static_bit_identical"] &= bool(
            torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
            and torch.equal(a.response_mask, b.response_mask))
        if "static+compile" in variants:
            z = calls["static+compile"](c, i)
            same = z.response_ids.shape == a.response_ids.shape and torch.equal(z.response_ids, a.response_ids)
            checks["plain_vs_compiled_tokens_identical"] &= bool(same)
            if same:
                checks["plain_vs_compiled_logprob_max_abs_diff"] = max(
                    checks["plain_vs_compiled_logprob_max_abs_diff"], float((z.logprobs - a.logprobs).abs().max()))
    # --- timing
    wall = {v: [] for v in variants + ["prefill"]}
    cpu = {v: [] for v in variants + ["prefill"]}
    columns = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for i, c in enumerate(batches):
            for v in order:
                w, p = time.perf_counter(), time.process_time()
                out = calls[v](c, 1000 * r + i)
                wall[v].append(time.perf_counter() - w)
                cpu[v].append(time.process_time() - p)
                columns[v].append(out.size(1) if isinstance(out, torch.Tensor) else out.response_ids.size(1))
            w, p = time.perf_counter(), time.process_time()
            prefill(c)
            wall["prefill"].append(time.perf_counter() - w)
            cpu["prefill"].append(time.process_time() - p)
    peak = peak_flops(args.threads)
    lens = [int(m.sum()) for c in batches for m in encode_prompts(tok, c)[1]]
    P = max(encode_prompts(tok, c)[0].size(1) for c in batches)
    cfg = model.config
    rows = {}
    pre_w = common.median(wall["prefill"])
    for v in variants + ["prefill"]:
        mw, mc = common.median(wall[v]), common.median(cpu[v])
        row = {"median_wall_s": round(mw, 4), "median_cpu_s": round(mc, 4), "min_wall_s": round(min(wall[v]), 4),
               "calls": len(wall[v])}
        if v != "prefill":
            cols = common.median(columns[v])
            f = flops(cfg, lens[:B], P, int(cols))
            dec_w = mw - pre_w
            row.update({
                "decode_columns": cols, "decode_wall_s": round(dec_w, 4),
                "decode_tokens_per_s": round(B * cols / dec_w, 1) if dec_w > 0 else None,
                "decode_flop": round(f["decode_flop"] / 1e9, 3), "decode_floor_s": round(f["decode_flop"] / peak, 4),
                "decode_x_floor": round(dec_w / (f["decode_flop"] / peak), 1) if dec_w > 0 else None,
            })
        rows[v] = row
    f = flops(cfg, lens[:B], P, R)
    rows["prefill"].update({"prefill_gflop": round(f["prefill_flop"] / 1e9, 3),
                            "prefill_floor_s": round(f["prefill_flop"] / peak, 4),
                            "prefill_x_floor": round(pre_w / (f["prefill_flop"] / peak), 1)})
    result = {
        **common.run_header("cpu_decode", load_start, t0),
        "load_start": snap_start, "load_end": common.load_snapshot(),
        "setup": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab": cfg.vocab_size, "batch": B,
                  "new_tokens": R, "threads": args.threads, "padded_prompt_len_max": P, "rounds": args.rounds,
                  "torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "peak_gflops_measured": round(peak / 1e9, 1),
        "compile_first_call_s": compile_s,
        "checks": checks,
        "variants": rows,
    }
    common.write_json(Path(args.out + ".json"), result)
    Path(args.out + ".md").write_text(report(result))
    print(report(result))


def report(res: dict) -> str:
    v, s = res["variants"], res["setup"]
    lines = [
        "# CPU decode: the library's sampling engines vs transformers' generate",
        "",
        f"{res['date']}, `{res['command']}`; {res['machine']['cpu_model']}, {s['threads']} threads; "
        f"torch {s['torch']}, "
        f"transformers {s['transformers']}. Load average at start {res['loadavg_start']}, at end {res['loadavg_end']} "
        "(a shared machine: wall times move with the load; process CPU seconds less so).",
        "",
        f"Shape: GPT-2 {s['n_layer']} layers x {s['n_embd']}, vocab {s['vocab']}, batch {s['batch']}, "
        f"{s['new_tokens']} new tokens, prompts padded to {s['padded_prompt_len_max']} tokens at most, fp32, "
        f"temperature 1, {s['rounds']} rounds x 4 batches per variant. Peak of this CPU, measured in the same run "
        f"(2048^2 fp32 matmul, {s['threads']} threads): **{res['peak_gflops_measured']} GFLOP/s**.",
        "",
        "| variant | s / call (wall, median) | CPU s / call | decode s | decode tokens/s | decode GFLOP | "
        "floor s | x floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in v.items():
        if name == "prefill":
            continue
        lines.append(f"| {name} | {row['median_wall_s']:.3f} | {row['median_cpu_s']:.3f} | "
                     f"{row['decode_wall_s']:.3f} | "
                     f"{row['decode_tokens_per_s']} | {row['decode_flop']} | {row['decode_floor_s']:.4f} | "
                     f"{row['decode_x_floor']} |")
    p = v["prefill"]
    lines += [
        "",
        f"Prefill alone (one forward of 16 prompts): {p['median_wall_s']:.4f} s wall, {p['prefill_gflop']} GFLOP, "
        f"floor {p['prefill_floor_s']:.4f} s ({p['prefill_x_floor']}x). Decode s = call - prefill.",
        f"Compile (static+compile, first call): {res['compile_first_call_s']} s.",
        "",
        "Checks: plain vs static bit-identical (tokens, masks, log-probs): "
        f"{res['checks']['plain_vs_static_bit_identical']}; "
        f"plain vs static+compile tokens identical: {res['checks']['plain_vs_compiled_tokens_identical']}, log-prob "
        f"max |diff| {res['checks']['plain_vs_compiled_logprob_max_abs_diff']:.2e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
