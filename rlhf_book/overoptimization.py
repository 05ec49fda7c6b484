"""Over-optimisation (chapter 8): best-of-n sampling, its KL to the base policy, reward-model ensembles, Gao's fits.

Best-of-n. Draw n replies y_1..y_n ~ p(. | x) from the base policy, keep the one the
(proxy) reward scores highest. :func:`best_of_n` does it for a batch of prompts and keeps
every score, so one draw of n replies per prompt gives the whole curve n' = 1..n:
:func:`expected_best_of_n` is the average, over *all* n'-subsets of the n replies, of the gold
reward of the subset's argmax-proxy reply (an unbiased estimate of E[gold of best-of-n']).

Its KL. With rewards sorted and F the CDF of the reward under p, the best-of-n policy is
pi_n(y) = F(r(y))^n - F(r(y)^-)^n (Beirami et al. 2024, "Theoretical guarantees on the
best-of-n alignment policy"), and KL(pi_n || p) <= log n - (n - 1)/n, with equality only
for continuous rewards with no ties. :func:`best_of_n_kl_exact` is the exact KL of a
categorical distribution (ties included), :func:`best_of_n_kl_estimate` a Monte-Carlo
estimate for a language model, where p(y) is the exact sequence probability and F is
estimated from samples; in a small world replies repeat, so the bound is loose.

Ensembles (Coste et al. 2023, "Reward model ensembles help mitigate overoptimization"):
:func:`ensemble_reward_fn` turns k reward functions into one, by mean, worst case (min),
mean - lambda std or mean - lambda variance; train the members with
:func:`rlhf_book.reward_model.train_reward_ensemble` or load the book's with
:func:`rlhf_book.reward_model.load_reward_ensemble`.

Scaling laws (Gao, Schulman, Hilton 2022, "Scaling laws for reward model overoptimization"):
with d = sqrt(KL), best-of-n gold gain R(d) = d (alpha - beta d) and RL's R(d) = d (alpha - beta log d);
:func:`fit_gao` fits either by least squares and reports the peak.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .rollout import prompt_texts, sample_groups, sequence_logprob

__all__ = [
    "AGGREGATES",
    "BestOfN",
    "EnsembleReward",
    "GaoFit",
    "aggregate_rewards",
    "best_of_n",
    "best_of_n_distribution",
    "best_of_n_kl_bound",
    "best_of_n_kl_estimate",
    "best_of_n_kl_exact",
    "best_of_n_kl_sampled",
    "best_of_n_weights",
    "ensemble_reward_fn",
    "expected_best_of_n",
    "fit_gao",
]


# ------------------------------------------------------------------- input checks
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _array(x, name: str, ndim: tuple[int, ...] = (1,)) -> np.ndarray:
    """``x`` (tensor, array or list) as a finite float64 array with ``ndim`` in ``ndim``; ValueError naming ``name``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, got {type(x).__name__}") from None
    if a.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has a NaN or infinite value at index {np.argwhere(~np.isfinite(a))[0].tolist()}")
    return a


def _check_reward_fn(fn, name: str) -> None:
    if not callable(fn):  # the library answers every bad argument with a ValueError naming it
        msg = f"{name} must be a function (prompts, responses, terminated) -> (B,), got {fn!r}"
        raise ValueError(msg)  # noqa: TRY004


# ------------------------------------------------------------------- best-of-n sampling
@dataclass
class BestOfN:
    """n replies per prompt and the reply each prompt keeps. P = prompts, n = replies per prompt.

    ``responses[i][j]`` is reply j to prompt i; ``terminated`` (P, n) bool; ``scores`` (P, n) the
    reward_fn's scores; ``logprobs`` (P, n) log p(y | x) of each reply under the sampling
    distribution (the policy at the sampling temperature: the sum of its token log-probs);
    ``best`` (P,) the index of the highest score (the first one on a tie).
    """

    prompts: list[str]
    responses: list[list[str]]
    terminated: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor
    best: torch.Tensor

    @property
    def chosen(self) -> list[str]:
        """The kept reply per prompt, (P,)."""
        return [r[b] for r, b in zip(self.responses, self.best.tolist())]

    @property
    def chosen_terminated(self) -> torch.Tensor:
        """Whether each kept reply ended with EOS, (P,)."""
        return self.terminated.gather(1, self.best[:, None]).squeeze(1)

    @property
    def chosen_scores(self) -> torch.Tensor:
        """The reward_fn's score of each kept reply (the max of its row), (P,)."""
        return self.scores.gather(1, self.best[:, None]).squeeze(1)

    def score(self, reward_fn: Callable) -> torch.Tensor:
        """Every reply scored by another reward function (e.g. the gold): ``reward_fn(...)`` as (P, n)."""
        n = self.scores.size(1)
        flat = torch.as_tensor(reward_fn([p for p in self.prompts for _ in range(n)],
                                         [r for row in self.responses for r in row], self.terminated.reshape(-1)),
                               dtype=torch.float32).reshape(-1)
        if flat.numel() != self.scores.numel():
            raise ValueError(f"reward_fn returned {flat.numel()} scores for {self.scores.numel()} replies")
        return flat.view_as(self.scores)


@torch.no_grad()
def best_of_n(
    policy,
    tokenizer,
    prompts: Sequence,
    n: int,
    reward_fn: Callable,
    *,
    max_new_tokens: int = 40,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    threads: int | None = 1,
) -> BestOfN:
    """Best-of-n: n replies per prompt, keep argmax_j reward_fn(x, y_j); -> :class:`BestOfN` with all (P, n) scores.

    ``reward_fn(prompts, responses, terminated) -> (B,)`` is any reward function (a reward
    model, an ensemble, the gold). Sampling uses its own ``torch.Generator`` seeded with
    ``seed``, at most ``batch_size`` replies (but at least one prompt's n) per
    :func:`~rlhf_book.rollout.generate` call, which prefills each prompt once; the n replies of a
    prompt are consecutive draws. A tie keeps the first reply: since draws are
    i.i.d., this splits a tie group's mass in proportion to p, as :func:`best_of_n_distribution` does.
    """
    texts = prompt_texts(prompts)
    n = _positive_int(n, "n")
    batch_size = _positive_int(batch_size, "batch_size")
    _check_reward_fn(reward_fn, "reward_fn")
    chunks = sample_groups(policy, tokenizer, texts, n, reward_fn, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, batch_size=batch_size, threads=threads)
    scores = [sc for _, sc in chunks]
    logps = [sequence_logprob(ro.logprobs, ro.response_mask).double().cpu() for ro, _ in chunks]
    terms = [ro.terminated.cpu() for ro, _ in chunks]
    replies = [r for ro, _ in chunks for r in ro.responses]
    s = torch.cat(scores).view(len(texts), n)
    return BestOfN(
        prompts=texts, responses=[replies[i * n : (i + 1) * n] for i in range(len(texts))],
        terminated=torch.cat(terms).view(len(texts), n), scores=s, logprobs=torch.cat(logps).view(len(texts), n),
        best=s.argmax(1),
    )


def best_of_n_weights(n: int, k: int) -> np.ndarray:
    """w_i = C(i-1, k-1) / C(n, k): P(the i-th smallest of n is the max of a random k-subset); -> (n,), i = 1..n."""
    n, k = _positive_int(n, "n"), _positive_int(k, "k")
    if k > n:
        raise ValueError(f"k must be <= n, got k={k}, n={n}")
    i = np.arange(1, n + 1, dtype=np.float64)
    w = np.zeros(n)
    ok = i >= k
    log_w = (_log_comb(i[ok] - 1, k - 1) - _log_comb(np.float64(n), k))
    w[ok] = np.exp(log_w)
    return w / w.sum()  # sum_i C(i-1, k-1) = C(n, k) exactly (hockey stick); this only removes rounding


def _log_comb(a, b) -> np.ndarray:
    """log C(a, b) via log-gamma, elementwise."""
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    return lg(np.asarray(a) + 1) - lg(np.asarray(b) + 1) - lg(np.asarray(a) - b + 1)


def expected_best_of_n(proxy, gold, ns: Sequence[int]) -> np.ndarray:
    """Mean over prompts of E[gold of the argmax-proxy reply of a random n'-subset]; (P, n), (P, n) -> (len(ns),).

    The average over *all* C(n, n') subsets of each prompt's n replies (a U-statistic: the
    unbiased estimate of the gold of best-of-n' from n i.i.d. draws), in closed form: sort a
    row by proxy ascending, then the i-th smallest is the subset's max with probability
    C(i-1, n'-1) / C(n, n') (:func:`best_of_n_weights`). Ties in proxy are broken uniformly at
    random: tied replies share their mean gold. ``expected_best_of_n(proxy, proxy, ns)`` is the
    proxy curve. ``proxy``/``gold``: tensors, arrays or lists, (P, n) or one prompt's (n,).
    """
    proxy = _array(proxy, "proxy", (1, 2))
    gold = _array(gold, "gold", (1, 2))
    proxy, gold = np.atleast_2d(proxy), np.atleast_2d(gold)
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold must have one shape, got {proxy.shape} and {gold.shape}")
    n = proxy.shape[1]
    if isinstance(ns, (str, bytes)) or not isinstance(ns, Sequence) or len(ns) == 0:
        raise ValueError(f"ns must be a non-empty list of integers in [1, n={n}], got {ns!r}")
    for k in ns:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n:
            raise ValueError(f"every n' in ns must be an integer in [1, n={n}], got {k!r}")
    order = np.argsort(proxy, axis=1, kind="stable")
    p_sorted = np.take_along_axis(proxy, order, 1)
    g_sorted = np.take_along_axis(gold, order, 1)
    for row in range(p_sorted.shape[0]):  # tied proxy scores: each tied reply gets the tie group's mean gold
        _, start, counts = np.unique(p_sorted[row], return_index=True, return_counts=True)
        for s, c in zip(start, counts):
            if c > 1:
                g_sorted[row, s : s + c] = g_sorted[row, s : s + c].mean()
    return np.array([(g_sorted @ best_of_n_weights(n, int(k))).mean() for k in ns])


# ------------------------------------------------------------------- KL of best-of-n
def best_of_n_kl_bound(n: int) -> float:
    """KL(pi_n || p) <= log n - (n - 1) / n (Beirami et al. 2024); equality for continuous rewards; n=1 gives 0."""
    n = _positive_int(n, "n")
    return math.log(n) - (n - 1) / n


def _categorical(p, rewards) -> tuple[np.ndarray, np.ndarray]:
    p = _array(p, "p")
    r = _array(rewards, "rewards")
    if p.shape != r.shape:
        raise ValueError(f"p and rewards must have one shape, got {p.shape} and {r.shape}")
    if (p < 0).any() or abs(p.sum() - 1) > 1e-6:
        raise ValueError(f"p must be a probability vector (>= 0, sum 1), got sum {p.sum():.6g}, min {p.min():.6g}")
    return p / p.sum(), r


def _tie_groups(p: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group of each atom, F_<(group), p(group)): atoms with equal reward form one group, groups by reward."""
    values, group = np.unique(r, return_inverse=True)
    mass = np.bincount(group, weights=p, minlength=len(values))
    below = np.concatenate([[0.0], np.cumsum(mass)[:-1]])
    return group, below, mass


def best_of_n_distribution(p, rewards, n: int) -> np.ndarray:
    """pi_n(y) = [F(r(y))^n - F(r(y)^-)^n] p(y) / p(r = r(y)): best-of-n of a categorical p; (K,), (K,) -> (K,).

    F is the CDF of the reward under p. Atoms with equal reward form a tie group, which
    gets F^n - F_<^n in total, split in proportion to p (what keeping the first of the tied
    draws does). Zero-probability atoms get 0.
    """
    p, r = _categorical(p, rewards)
    n = _positive_int(n, "n")
    group, below, mass = _tie_groups(p, r)
    group_pi = np.minimum(below + mass, 1.0) ** n - below**n
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(mass[group] > 0, p / mass[group], 0.0)
    return group_pi[group] * share


def best_of_n_kl_exact(p, rewards, n: int) -> float:
    """KL(pi_n || p) = sum_y pi_n(y) log(pi_n(y) / p(y)) exactly, for a categorical p; (K,), (K,) -> float (nats).

    Within a tie group pi_n(y)/p(y) = (F^n - F_<^n) / p(group) is constant, so the sum runs
    over groups: sum_G (F_G^n - F_<G^n) log((F_G^n - F_<G^n) / p(G)). Equals the bound
    log n - (n-1)/n only in the limit of many atoms with distinct rewards; below it otherwise.
    """
    p, r = _categorical(p, rewards)
    n = _positive_int(n, "n")
    _, below, mass = _tie_groups(p, r)
    keep = mass > 0
    log_ratio = _log_bon_ratio(below[keep], np.log(mass[keep]), n)
    return max(0.0, float(np.sum(np.exp(log_ratio + np.log(mass[keep])) * log_ratio)))  # >= 0 but for rounding


def _log_bon_ratio(below: np.ndarray, log_p: np.ndarray, n: int) -> np.ndarray:
    """log[((F_< + p)^n - F_<^n) / p] without cancellation: n log(F_< + p) + log(1 - (F_< / (F_< + p))^n) - log p."""
    p = np.exp(log_p)
    top = np.minimum(below + p, 1.0)
    with np.errstate(divide="ignore"):
        # log(F_< / (F_< + p)) = -log1p(p / F_<), -inf when F_< = 0
        log_frac = np.where(below > 0, -np.log1p(p / np.where(below > 0, below, 1.0)), -np.inf)
    return n * np.log(top) + np.log(-np.expm1(n * log_frac)) - log_p


def best_of_n_kl_estimate(logp, rewards, ref_rewards, n: int) -> np.ndarray:
    """Monte-Carlo KL(pi_n || p) per prompt: mean_j log[((F_<(y_j) + p(y_j))^n - F_<(y_j)^n) / p(y_j)]; -> (P,).

    ``logp`` (P, J): exact log p(y_j | x) under the base policy (sum of token log-probs,
    :func:`rlhf_book.rollout.sequence_logprob`) of J best-of-n draws y_j ~ pi_n per prompt;
    ``rewards`` (P, J) their rewards; ``ref_rewards`` (P, m) rewards of m i.i.d. base-policy
    replies to the same prompt, giving the estimate F_<(y) = #{ref reward < r(y)} / m (clipped
    so that F_< + p <= 1). KL = E_{y ~ pi_n}[log(pi_n(y)/p(y))]; average the (P,) result over
    prompts for E_x KL. (P = 1 may be given as 1-D arrays.)

    Where it departs from Beirami et al. 2024: their log n - (n-1)/n is an upper bound, tight
    only for continuous distinct rewards; here the replies of a small world repeat and the
    estimate uses their exact p(y). The formula treats y's reward group as y alone: it is
    exact when no *other* reply has exactly the same reward (true for a learned reward
    model's float scores, where only identical token sequences tie); with distinct replies
    that tie it is an approximation. Sampling noise: F_< is estimated from m replies, pi_n from J.
    """
    logp = np.atleast_2d(_array(logp, "logp", (1, 2)))
    rewards = np.atleast_2d(_array(rewards, "rewards", (1, 2)))
    ref = np.atleast_2d(_array(ref_rewards, "ref_rewards", (1, 2)))
    n = _positive_int(n, "n")
    if logp.shape != rewards.shape:
        raise ValueError(f"logp and rewards must have one shape (P, J), got {logp.shape} and {rewards.shape}")
    if ref.shape[0] != logp.shape[0]:
        raise ValueError(f"ref_rewards must have one row per prompt: {ref.shape[0]} rows for {logp.shape[0]} prompts")
    if (logp > 1e-6).any():
        raise ValueError(f"logp must be log-probabilities (<= 0), got max {logp.max():.6g}")
    logp = np.minimum(logp, 0.0)
    ref = np.sort(ref, axis=1)  # F_<(y) = #{ref reward < r(y)} / m, per prompt: (P, J)
    below = np.stack([np.searchsorted(row, r, side="left") for row, r in zip(ref, rewards)]) / ref.shape[1]
    below = np.minimum(below, 1.0 - np.exp(logp))
    return _log_bon_ratio(below, logp, n).mean(1)


def best_of_n_kl_sampled(
    policy,
    tokenizer,
    prompts: Sequence,
    n: int,
    reward_fn: Callable,
    draws: int = 8,
    **sampling,
) -> dict:
    """Monte-Carlo KL(pi_n || p) to the sampling policy p: n * draws replies per prompt, ``draws`` groups of n.

    Each group's argmax is one draw y_j ~ pi_n; all n * draws replies serve as the m reference
    replies for F_<; p(y_j) is the reply's exact probability (its sampled token log-probs, at
    the sampling temperature). ``sampling`` goes to :func:`best_of_n` (max_new_tokens,
    temperature, seed, batch_size, threads). Returns ``{"kl", "kl_per_prompt" (P,), "bound", "n", "draws"}``;
    see :func:`best_of_n_kl_estimate`.
    """
    n, draws = _positive_int(n, "n"), _positive_int(draws, "draws")
    bon = best_of_n(policy, tokenizer, prompts, n * draws, reward_fn, **sampling)
    P = len(bon.prompts)
    s = bon.scores.double().view(P, draws, n)
    pick = s.argmax(-1, keepdim=True)
    chosen_r = s.gather(-1, pick).squeeze(-1)
    chosen_lp = bon.logprobs.view(P, draws, n).gather(-1, pick).squeeze(-1)
    per_prompt = best_of_n_kl_estimate(chosen_lp, chosen_r, bon.scores.double(), n)
    return {"kl": float(per_prompt.mean()), "kl_per_prompt": per_prompt, "bound": best_of_n_kl_bound(n), "n": n,
            "draws": draws}


# ------------------------------------------------------------------- reward-model ensembles
AGGREGATES = ("mean", "min", "mean_minus_std", "mean_minus_var")


def aggregate_rewards(scores, aggregate: str = "mean", lam: float = 1.0) -> torch.Tensor:
    """One reward from k members' scores (k, B) -> (B,): mean, min, mean - lam std or mean - lam var.

    std and var are over the k members with ddof=0 (one member: 0). ``min`` is Coste et
    al.'s worst-case optimisation (WCO), ``mean_minus_var`` their uncertainty-weighted
    optimisation (UWO, mean - lambda * intra-ensemble variance), ``mean_minus_std`` the same
    penalty on the std scale (the scale of the rewards themselves).
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    s = torch.as_tensor(scores, dtype=torch.float32)
    if s.dim() != 2 or s.size(0) < 1:
        raise ValueError(f"scores must be (k members, B replies), got shape {tuple(s.shape)}")
    if aggregate == "mean":
        return s.mean(0)
    if aggregate == "min":
        return s.min(0).values
    var = s.var(0, unbiased=False)
    return s.mean(0) - lam * (var.sqrt() if aggregate == "mean_minus_std" else var)


class EnsembleReward:
    """k reward functions as one: ``(prompts, responses, terminated=None) -> FloatTensor (B,)`` (CPU), aggregated.

    What :func:`ensemble_reward_fn` returns; ``to(device)`` moves every member that can move
    (the RL trainers call it), ``members(prompts, responses, terminated)`` gives the (k, B) scores.
    """

    def __init__(self, reward_fns: Sequence[Callable], aggregate: str = "mean", lam: float = 1.0):
        self.reward_fns, self.aggregate, self.lam = list(reward_fns), aggregate, lam

    def members(self, prompts: Sequence[str], responses: Sequence[str], terminated=None) -> torch.Tensor:
        """Every member's scores, (k, B)."""
        rows = []
        for i, fn in enumerate(self.reward_fns):
            r = torch.as_tensor(fn(prompts, responses, terminated), dtype=torch.float32).detach().cpu().reshape(-1)
            if r.numel() != len(responses):
                raise ValueError(f"reward_fns[{i}] returned {r.numel()} scores for {len(responses)} replies")
            rows.append(r)
        return torch.stack(rows)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], terminated=None) -> torch.Tensor:
        return aggregate_rewards(self.members(prompts, responses, terminated), self.aggregate, self.lam)

    def to(self, device) -> EnsembleReward:
        """Move every member that has ``to`` (e.g. a :class:`~rlhf_book.reward_model.ModelReward`); returns self."""
        for fn in self.reward_fns:
            if hasattr(fn, "to"):
                fn.to(device)
        return self


def ensemble_reward_fn(reward_fns: Sequence[Callable], aggregate: str = "mean", lam: float = 1.0) -> EnsembleReward:
    """r(x, y) = aggregate_i r_i(x, y) over k reward functions (Coste et al. 2023); a reward function, (B,).

    ``aggregate``: ``"mean"``, ``"min"`` (worst case), ``"mean_minus_std"`` (mean - lam std) or
    ``"mean_minus_var"`` (mean - lam variance, Coste et al.'s UWO); see :func:`aggregate_rewards`.
    No standardisation happens here: the members' scores are combined as they come, as Coste
    et al. combine their members' outputs. The library's reward models are each already
    normalised to mean 0, std 1 on base-policy replies (:func:`rlhf_book.normalize_reward_model`),
    which is what makes min, std and variance across members meaningful; members on other
    scales should be normalised the same way first (else min picks the lowest-scaled member).
    """
    if isinstance(reward_fns, (str, bytes)) or not isinstance(reward_fns, Sequence) or len(reward_fns) == 0:
        raise ValueError(f"reward_fns must be a non-empty list of reward functions, got {reward_fns!r}")
    for i, fn in enumerate(reward_fns):
        _check_reward_fn(fn, f"reward_fns[{i}]")
    aggregate_rewards(torch.zeros(1, 1), aggregate, lam)  # bad aggregate / lam fail here, not in a training loop
    return EnsembleReward(reward_fns, aggregate, lam)


# ------------------------------------------------------------------- Gao et al.'s functional forms
FORMS = ("bon", "rl")


@dataclass(frozen=True)
class GaoFit:
    """A fit of Gao et al.'s R(d), d = sqrt(KL): ``bon`` d (alpha - beta d), ``rl`` d (alpha - beta log d).

    ``r2`` is 1 - SS_res / SS_tot (about the mean; nan when every reward is equal);
    ``d_peak`` the d of the maximum (``bon``: alpha / (2 beta), ``rl``: exp(alpha / beta - 1);
    inf when the fitted curve never turns down, 0 when it never rises), ``kl_peak`` = d_peak^2.
    """

    form: str
    alpha: float
    beta: float
    r2: float
    d_peak: float
    kl_peak: float
    n_points: int

    def predict(self, kl) -> np.ndarray:
        """R(sqrt(KL)) of the fitted form, same shape as ``kl``."""
        d = np.sqrt(np.asarray(kl, dtype=np.float64))
        return (_design(d.reshape(-1), self.form) @ np.array([self.alpha, self.beta])).reshape(d.shape)


def _design(d: np.ndarray, form: str) -> np.ndarray:
    """Columns (d, -d^2) for bon, (d, -d log d) for rl (0 at d = 0); (N,) -> (N, 2)."""
    if form == "bon":
        second = d * d
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            second = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return np.stack([d, -second], axis=-1)


def _peak(form: str, alpha: float, beta: float) -> float:
    if beta > 0:
        if form == "bon":
            return max(0.0, alpha / (2 * beta))
        try:
            return math.exp(alpha / beta - 1)
        except OverflowError:
            return math.inf
    if beta == 0:
        return math.inf if alpha > 0 else 0.0
    return math.inf


def fit_gao(kl, reward, form: str = "bon") -> GaoFit:
    """Least squares of R(d) = d (alpha - beta d) (``bon``) or d (alpha - beta log d) (``rl``), d = sqrt(KL); -> GaoFit.

    Gao, Schulman, Hilton 2022. Both forms are linear in (alpha, beta), so this is
    ``numpy.linalg.lstsq`` on the columns (d, -d^2) or (d, -d log d), with no intercept: the
    forms have R(0) = 0, so ``reward`` must be the gain over the base policy (subtract its
    reward at KL 0). Needs at least 3 points, 2 of them with KL > 0.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    kl = _array(kl, "kl")
    reward = _array(reward, "reward")
    if kl.shape != reward.shape:
        raise ValueError(f"kl and reward must have one length, got {kl.size} and {reward.size}")
    if (kl < 0).any():
        raise ValueError(f"kl must be >= 0, got {kl.min():.6g} at index {int(np.argmin(kl))}")
    if kl.size < 3 or np.unique(kl[kl > 0]).size < 2:
        raise ValueError(f"kl needs at least 3 points, 2 distinct ones > 0, to fit 2 coefficients; got {kl.tolist()}")
    X = _design(np.sqrt(kl), form)
    (alpha, beta), *_ = np.linalg.lstsq(X, reward, rcond=None)
    resid = reward - X @ np.array([alpha, beta])
    ss_tot = float(((reward - reward.mean()) ** 2).sum())
    r2 = 1 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    d_peak = _peak(form, float(alpha), float(beta))
    return GaoFit(form, float(alpha), float(beta), r2, d_peak, d_peak**2, int(kl.size))
