"""Plot helpers: the seed aggregate is the mean, min and max at the steps every seed has; plots draw what exists."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

import math  # noqa: E402

from rlhf_book.plotting import best_within, plot_run, plot_seeds, seed_curves  # noqa: E402

RUNS = [
    [{"step": 0, "eval_kl": 0.0, "gold": 1.0}, {"step": 4, "eval_kl": 2.0, "gold": 2.0}, {"step": 8, "eval_kl": 3.0}],
    [{"step": 0, "eval_kl": 0.0, "gold": 3.0}, {"step": 4, "eval_kl": 4.0, "gold": float("nan")},
     {"step": 8, "eval_kl": 5.0, "gold": 4.0}],
]


def test_seed_curves_by_hand():
    c = seed_curves(RUNS, "gold")
    # step 4 has no finite gold in seed 2 and step 8 none in seed 1: only step 0 is shared
    assert c["step"] == [0] and c["y"] == [2.0] and (c["y_lo"], c["y_hi"]) == ([1.0], [3.0])
    c = seed_curves(RUNS, "eval_kl")
    assert c["step"] == [0, 4, 8] and c["y"] == [0.0, 3.0, 4.0] and c["y_hi"] == [0.0, 4.0, 5.0]
    f = seed_curves([RUNS[0], RUNS[0]], "gold", x_key="eval_kl")
    assert f["x"] == [0.0, 2.0] and f["y"] == [1.0, 2.0] and f["x_lo"] == f["x_hi"] == [0.0, 2.0]


def test_plots_draw_only_what_the_histories_have():
    ax = plot_seeds({"a": RUNS, "b": [RUNS[0]]}, "eval_kl")
    assert len(ax.get_lines()) == 2 and "a (2 seeds)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plot_seeds({"a": RUNS}, "gold", x_key="eval_kl")
    fig = plot_run([{"step": 1, "loss": 0.6, "reward_chosen": 0.1, "reward_rejected": -0.1, "logp_chosen": -20.0}])
    assert {a.get_title() for a in fig.axes if a.get_visible()} == {"loss", "implicit rewards", "log-probs of the data"}
    with pytest.raises(ValueError, match="none of the plotted keys"):
        plot_run([{"step": 1, "nothing": 1.0}])


def test_best_within_a_budget_by_hand():
    # rows (kl, gold): (0, 1), (2, 2), (0, 3), (5, 4) over two runs; step 8 of run 1 has no gold, NaN gold is skipped
    assert best_within(RUNS, 1.0, y_key="gold") == 3.0
    assert best_within(RUNS, 4.0, y_key="gold") == 3.0  # (4, nan) does not count
    assert best_within(RUNS, 5.0, y_key="gold") == 4.0
    assert math.isnan(best_within(RUNS, -1.0, y_key="gold"))
    assert best_within([[{"eval_kl": 0.0, "g": float("nan")}, {"eval_kl": 0.0, "g": 1.0}]], 1.0, y_key="g") == 1.0


def test_the_pipeline_figure_highlights_each_chapters_boxes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    from rlhf_book.plotting import plot_pipeline

    def lit(fig):
        return sum(1 for p in fig.axes[0].patches if isinstance(p, FancyBboxPatch) and p.get_linewidth() > 1.0)

    assert lit(plot_pipeline()) == 0
    for chapter, boxes in ((1, 3), (2, 2), (5, 3), (9, 5)):
        assert lit(plot_pipeline(chapter)) == boxes
    plt.close("all")
    with pytest.raises(ValueError, match="chapter must be one of"):
        plot_pipeline(10)
