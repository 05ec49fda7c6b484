"""Plots of training runs: the diagnostics panel, runs side by side, and the reward-KL frontier.

A *history* is what every trainer of the library returns (base LM, reward model, A2C,
PPO, ...): a list of dicts, one per step, each with a ``step`` key; evaluations
(``eval_*`` for RL, ``val_*`` for base-LM and reward-model training) appear only on the
steps where they were run. Missing or non-finite values are skipped, so any subset of the
keys can be plotted, and :func:`plot_run` draws only the panels a history has data for.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["series", "plot_run", "plot_runs", "plot_frontier", "seed_curves", "plot_seeds", "best_within", "plot_pipeline",
           "PANELS"]

# (title, [(history key, legend label), ...], y label)
PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    # supervised training (base LM, reward model)
    ("loss", [("train_loss", "train"), ("loss", "train"), ("val_loss", "validation")], "loss"),
    ("accuracy", [("accuracy", "train batch"), ("val_accuracy", "validation (labels)"),
                  ("val_gold_accuracy", "validation (gold)")], "pairwise accuracy"),
    # RL
    ("reward", [("proxy_reward", "proxy (train)"), ("gold_reward", "gold (train)"),
                ("eval_proxy_reward", "proxy (held-out)"), ("eval_gold_reward", "gold (held-out)")], "mean reward"),
    ("KL(pi || pi_ref)", [("kl", "k1 (train)"), ("kl_k3", "k3 (train)"), ("eval_kl", "k1 (held-out)")],
     "sequence KL (nats)"),
    ("KL coefficient", [("beta", "beta")], "beta"),
    ("clip fraction", [("clipfrac", "clipped tokens")], "fraction of tokens"),
    ("approx KL(pi_old || pi)", [("approx_kl", "k3 per token")], "nats / token"),
    ("entropy", [("entropy", "policy entropy")], "nats / token"),
    ("value loss", [("value_loss", "value loss")], "loss"),
    ("explained variance", [("explained_variance", "1 - Var[R - V] / Var[R]")], "explained variance"),
    ("response length", [("response_length", "tokens"), ("eval_response_length", "tokens (held-out)")], "tokens"),
    # critic-free RL (chapter 7)
    ("group rewards", [("reward_std", "std over the batch"), ("group_reward_std", "mean std within a group")],
     "reward std"),
    ("advantage std", [("advantage_std", "std of the sequence advantages")], "advantage std"),
    ("degenerate groups", [("degenerate_groups", "K equal rewards")], "share of groups"),
    # DPO
    ("implicit rewards", [("reward_chosen", "chosen"), ("reward_rejected", "rejected"), ("reward_margin", "margin"),
                          ("val_reward_chosen", "chosen (held-out)"), ("val_reward_rejected", "rejected (held-out)"),
                          ("val_reward_margin", "margin (held-out)")], "beta * log(pi / pi_ref)"),
    ("log-probs of the data", [("logp_chosen", "chosen"), ("logp_rejected", "rejected"),
                               ("val_logp_chosen", "chosen (held-out)"), ("val_logp_rejected", "rejected (held-out)")],
     "log pi(y | x), nats"),
]


def _finite(v) -> bool:
    """A plottable value: an int or float (not a bool), finite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(history: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of ``key`` over a history, skipping iterations without a finite value."""
    xs, ys = [], []
    for h in history:
        v = h.get(key)
        if _finite(v):
            xs.append(h.get("step", len(xs)))
            ys.append(float(v))
    return xs, ys


def _style(key: str) -> dict:
    return {"marker": "o", "ms": 3} if key.startswith(("eval_", "val_")) else {"lw": 1.2}


def plot_run(history: Sequence[Mapping], title: str | None = None, panels=None, xlabel: str = "step", ncols: int = 3):
    """The diagnostics of one run: one labelled panel per quantity the history has (grid of ``ncols``); returns the figure."""
    import matplotlib.pyplot as plt

    panels = [p for p in (PANELS if panels is None else panels) if any(series(history, k)[0] for k, _ in p[1])]
    if not panels:
        raise ValueError(f"the history has none of the plotted keys; it has {sorted({k for h in history for k in h})}")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (name, keys, ylabel) in zip(axes.flat, panels):
        drawn = 0
        for key, label in keys:
            xs, ys = series(history, key)
            if xs:
                ax.plot(xs, ys, label=label, **_style(key))
                drawn += 1
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(
    runs: Mapping[str, Sequence[Mapping]],
    keys: Sequence[tuple[str, str]] = (
        ("eval_proxy_reward", "proxy reward (held-out)"),
        ("eval_gold_reward", "gold reward (held-out)"),
        ("eval_kl", "KL to reference (nats)"),
    ),
    title: str | None = None,
    xlabel: str = "iteration",
    ncols: int = 3,
):
    """Several runs (``{label: history}``) overlaid, one panel per ``(key, y label)``; returns the figure."""
    import matplotlib.pyplot as plt

    ncols = min(ncols, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows), squeeze=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    for ax, (key, ylabel) in zip(axes.flat, keys):
        for label, history in runs.items():
            xs, ys = series(history, key)
            if xs:
                ax.plot(xs, ys, label=label, **_style(key))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_frontier(
    runs: Mapping[str, Sequence[Mapping]],
    reward_key: str = "eval_gold_reward",
    kl_key: str = "eval_kl",
    title: str | None = "reward-KL frontier",
    ax=None,
):
    """Reward (gold by default) against KL to the reference, one line per run, points in iteration order."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
    else:
        fig = ax.figure
    for label, history in runs.items():
        pts = [(h[kl_key], h[reward_key]) for h in history
               if isinstance(h.get(kl_key), (int, float)) and isinstance(h.get(reward_key), (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    ax.set_xlabel("KL(pi || pi_ref), nats per response")
    ax.set_ylabel(reward_key.replace("eval_", "held-out ").replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def seed_curves(histories: Sequence[Sequence[Mapping]], y_key: str, x_key: str = "step") -> dict[str, list[float]]:
    """Mean, min and max over seeds of ``y_key`` (and of ``x_key``) at each step every history has both keys at.

    Returns ``{"step", "x", "x_lo", "x_hi", "y", "y_lo", "y_hi"}``, lists ordered by step.
    """
    per_seed = []
    for h in histories:
        rows = {}
        for r in h:
            x, y = r.get(x_key), r.get(y_key)
            if _finite(x) and _finite(y):
                rows[r.get("step")] = (float(x), float(y))
        per_seed.append(rows)
    steps = sorted(set.intersection(*(set(r) for r in per_seed))) if per_seed else []
    out: dict[str, list[float]] = {k: [] for k in ("step", "x", "x_lo", "x_hi", "y", "y_lo", "y_hi")}
    for s in steps:
        xs, ys = [r[s][0] for r in per_seed], [r[s][1] for r in per_seed]
        out["step"].append(s)
        for name, v in (("x", xs), ("y", ys)):
            out[name].append(sum(v) / len(v))
            out[f"{name}_lo"].append(min(v))
            out[f"{name}_hi"].append(max(v))
    return out


def best_within(histories: Sequence[Sequence[Mapping]], budget: float, y_key: str = "eval_gold_reward",
                x_key: str = "eval_kl") -> float:
    """The frontier at a budget: max of ``y_key`` over every row of ``histories`` with ``x_key`` <= ``budget``.

    ``histories``: the runs of one method and one seed (e.g. all its betas); NaN if no row fits.
    """
    ys = [y for x, y in ((r.get(x_key), r.get(y_key)) for h in histories for r in h)
          if _finite(x) and _finite(y) and x <= budget]
    return float(max(ys)) if ys else math.nan



def plot_seeds(
    groups: Mapping[str, Sequence[Sequence[Mapping]]],
    y_key: str,
    x_key: str = "step",
    ax=None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    styles: Mapping[str, dict] | None = None,
):
    """Runs of several seeds per label (``{label: [history, ...]}``): the mean over seeds, and their min-max spread.

    Against ``step`` the spread is a band; against another key (e.g. ``eval_kl``, a
    frontier) it is an error bar in both directions at each evaluated step. ``styles``:
    matplotlib keywords per label (e.g. ``{"PPO": {"ls": "--", "marker": "s"}}``). Returns the axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.8))
    for label, histories in groups.items():
        c = seed_curves(histories, y_key, x_key)
        if not c["step"]:
            continue
        name = f"{label} ({len(histories)} seeds)"
        style = {"marker": "o", "ms": 2.5 if x_key == "step" else 3, **(styles or {}).get(label, {})}
        if x_key == "step":
            (line,) = ax.plot(c["x"], c["y"], label=name, **style)
            ax.fill_between(c["x"], c["y_lo"], c["y_hi"], color=line.get_color(), alpha=0.2, lw=0)
        else:
            err = lambda m, lo, hi: [[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]]  # noqa: E731
            ax.errorbar(c["x"], c["y"], xerr=err(c["x"], c["x_lo"], c["x_hi"]), yerr=err(c["y"], c["y_lo"], c["y_hi"]),
                        lw=1.2, elinewidth=0.6, capsize=0, label=name, **style)
    ax.set_xlabel(xlabel or x_key)
    ax.set_ylabel(ylabel or y_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return ax


# ---------------------------------------------------------------------------- the RLHF pipeline (the book's map)
# box name -> (x, y, text); x, y: the centre in axes coordinates (0..1)
_PIPELINE_BOXES = {
    "pretrain": (0.125, 0.82, "1  Pretraining\nnext-token loss on text\n-> the base LM"),
    "sft": (0.375, 0.82, r"2  Supervised fine-tuning" "\nimitate demonstrations\n" r"max $\log \pi_\theta(y_{\mathrm{demo}} \mid x)$"),
    "rm": (0.625, 0.82, r"3  Reward model $r_\phi$" "\nBradley-Terry on\npreference pairs"),
    "rl": (0.875, 0.82, r"4  RL fine-tuning" "\n" r"max $\mathbb{E}[r_\phi]$" "\n"
           r"$-\ \beta\,\mathrm{KL}(\pi_\theta \Vert \pi_{\mathrm{ref}})$"),
    "prompts": (0.06, 0.31, r"prompts $x$"),
    "policy": (0.235, 0.31, r"policy $\pi_\theta$" "\n(actor)\nsamples $y$"),
    "reward": (0.475, 0.475, r"reward model $r_\phi(x, y)$" "\n" r"or a verifier (ch. 9)"),
    "reference": (0.475, 0.31, r"reference $\pi_{\mathrm{ref}}$" "\nlog-probs -> KL"),
    "critic": (0.475, 0.145, r"critic $V_\psi(s_t)$" "\n(none in ch. 7)"),
    "advantages": (0.72, 0.31, r"per-token rewards" "\nand advantages $A_t$"),
    "update": (0.915, 0.31, r"update $\theta$" "\n" r"(and $\psi$)"),
}
_PIPELINE_SIZES = {"prompts": (0.1, 0.075), "policy": (0.15, 0.13), "reward": (0.2, 0.125), "reference": (0.2, 0.125),
                   "critic": (0.2, 0.125), "advantages": (0.2, 0.125), "update": (0.14, 0.125)}  # (w, h); stages: 0.215 x 0.2
_PIPELINE_CHAPTERS = {  # chapter -> the boxes it builds or studies
    1: ("pretrain", "sft", "policy"), 2: ("rm", "reward"), 3: ("rl", "policy", "critic", "advantages", "update"),
    4: ("critic", "advantages"), 5: ("rl", "reference", "update"), 6: ("sft", "rm", "dpo"),
    7: ("rl", "advantages", "update"), 8: ("rm", "rl", "reward"), 9: ("pretrain", "sft", "rl", "reward", "advantages"),
}
_PIPELINE_LABELS = {"pretrain": "ch. 1, 9", "sft": "ch. 1, 9", "rm": "ch. 2, 8", "rl": "ch. 3-5, 7-9", "reward": "ch. 2, 9",
                    "reference": "ch. 5", "critic": "ch. 3, 4, 9", "advantages": "ch. 3, 4, 7, 9", "update": "ch. 3, 5, 7"}
# The figure is drawn at about the width of the book site's column (~900 px at the inline backend's 100 dpi), so
# that it is shown unscaled there: its smallest text (8.5 pt) is then ~12 px on screen (tests/test_site.py checks).
PIPELINE_FIGSIZE = (8.8, 6.4)
PIPELINE_FONTS = {"title": 12, "box": 10, "note": 9.5, "chapter": 8.5}  # points


def plot_pipeline(chapter: int | None = None):
    """The RLHF pipeline: its four stages, one RL iteration's data flow, which chapter builds each box.

    ``chapter`` (1-9) highlights the boxes that chapter builds or studies. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    if chapter is not None and chapter not in _PIPELINE_CHAPTERS:
        raise ValueError(f"chapter must be one of {sorted(_PIPELINE_CHAPTERS)} or None, got {chapter!r}")
    lit = set(_PIPELINE_CHAPTERS.get(chapter, ()))
    fonts = PIPELINE_FONTS
    fig, ax = plt.subplots(figsize=PIPELINE_FIGSIZE)
    ax.set(xlim=(0, 1), ylim=(-0.03, 1.06))
    ax.axis("off")
    sizes = {}
    for name, (x, y, text) in _PIPELINE_BOXES.items():
        w, h = sizes[name] = _PIPELINE_SIZES.get(name, (0.215, 0.2))
        face = "#fde68a" if name in lit else ("#e0ecf8" if y > 0.7 else "#f3f4f6")
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.006", fc=face, ec="#374151",
                                    lw=1.6 if name in lit else 0.8))
        labelled = name in _PIPELINE_LABELS
        ax.text(x, y + (0.014 if labelled else 0.0), text, ha="center", va="center", fontsize=fonts["box"],
                linespacing=1.25)
        if labelled:
            ax.text(x + w / 2 - 0.006, y - h / 2 + 0.006, _PIPELINE_LABELS[name], ha="right", va="bottom",
                    fontsize=fonts["chapter"], color="#4b5563", style="italic")

    def arrow(a, b, rad=0.0, **kw):
        (xa, ya, _), (xb, yb, _) = _PIPELINE_BOXES[a], _PIPELINE_BOXES[b]
        (wa, _), (wb, _) = sizes[a], sizes[b]
        if abs(ya - yb) < 1e-9:
            start, end = (xa + wa / 2, ya), (xb - wb / 2, yb)
        else:
            start, end = (xa + (wa / 2 if xb > xa else -wa / 2), ya), (xb + (-wb / 2 if xb > xa else wb / 2), yb)
        ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=kw.get("color", "#374151"),
                                                                lw=1.0, ls=kw.get("ls", "-"),
                                                                connectionstyle=f"arc3,rad={rad}"))

    for a, b in (("pretrain", "sft"), ("sft", "rm"), ("rm", "rl"), ("prompts", "policy"), ("policy", "reward"),
                 ("policy", "reference"), ("policy", "critic"), ("reward", "advantages"), ("reference", "advantages"),
                 ("critic", "advantages"), ("advantages", "update")):
        arrow(a, b)
    # the update changes the policy that samples the next batch
    low, (x_update, y_loop, _), (x_policy, _, _) = 0.03, _PIPELINE_BOXES["update"], _PIPELINE_BOXES["policy"]
    ax.plot([x_update, x_update, x_policy], [y_loop - sizes["update"][1] / 2, low, low], color="#374151", lw=1.0)
    ax.annotate("", xy=(x_policy, y_loop - sizes["policy"][1] / 2), xytext=(x_policy, low),
                arrowprops=dict(arrowstyle="-|>", color="#374151", lw=1.0))
    ax.text(0.72, low + 0.012, "next iteration: the updated policy samples again", ha="center", va="bottom",
            fontsize=fonts["note"], color="#374151")
    # DPO: from the preference data straight to the policy, no reward model, no RL
    dpo_lit = "dpo" in lit
    top = 0.82 + 0.1
    ax.annotate("", xy=(0.875, top), xytext=(0.375, top), arrowprops=dict(
        arrowstyle="-|>", color="#b45309" if dpo_lit else "#9ca3af", lw=1.6 if dpo_lit else 1.0, ls="--",
        connectionstyle="arc3,rad=-0.1"))
    ax.text(0.5, 1.0, "DPO (ch. 6): from preference pairs to the policy directly,\nno reward model, no sampling",
            ha="center", va="bottom", fontsize=fonts["note"], color="#b45309" if dpo_lit else "#4b5563", linespacing=1.2)
    # stage 4 is the loop below
    ax.plot([0.875, 0.875], [0.82 - 0.1, 0.64], color="#9ca3af", lw=0.8, ls=":")
    ax.add_patch(FancyBboxPatch((0.005, -0.01), 0.99, 0.65, boxstyle="round,pad=0.005", fc="none", ec="#9ca3af",
                                lw=0.8, ls=":"))
    ax.text(0.015, 0.625, "one iteration of stage 4: the four models of the RL stage\n(policy, reference, reward "
            "model, critic)", fontsize=fonts["note"], va="top", color="#374151", linespacing=1.2)
    title = "The RLHF pipeline" + (f" (highlighted: what chapter {chapter} builds or studies)" if chapter else "")
    ax.set_title(title, fontsize=fonts["title"], pad=4)
    fig.tight_layout()
    return fig
