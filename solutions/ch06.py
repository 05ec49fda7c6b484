"""Reference solutions for the chapter 6 exercises (try them yourself first!)."""

import math

import torch
import torch.nn.functional as F

# log-ratios: chosen -12 - (-13) = +1, rejected -15 - (-14) = -1; beta * (1 - (-1)) = 1; -log sigmoid(1)
answer_dpo_loss = math.log(1 + math.exp(-1.0))

# implicit rewards: chosen 0.1 * (-20 - (-23)) = +0.3, rejected 0.1 * (-25 - (-22)) = -0.3; the gradient weight
# sigmoid(r_rejected - r_chosen) = sigmoid(-0.6): the pair is already ranked right, so it counts less than half
answer_gradient_weight = 1 / (1 + math.exp(0.6))


def dpo_loss(lp_chosen, ref_chosen, mask_chosen, lp_rejected, ref_rejected, mask_rejected, beta):
    """-log sigmoid(beta [(log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l)]); (B, T) inputs -> (B,)."""
    def seq(x, mask):
        return torch.where(mask.bool(), x, 0.0).sum(-1)  # select, not multiply: padding holds NaN

    chosen = seq(lp_chosen, mask_chosen) - seq(ref_chosen, mask_chosen)
    rejected = seq(lp_rejected, mask_rejected) - seq(ref_rejected, mask_rejected)
    return -F.logsigmoid(beta * (chosen - rejected))


# sigmoid: c (Bradley-Terry on implicit rewards); hinge: a (stops at a margin); ipo: d (squared, a target gap);
# simpo: b (length-normalised likelihood, no reference)
answer_matching = {"sigmoid": "c", "hinge": "a", "ipo": "d", "simpo": "b"}

# both log-probs fall while the margin grows: probability leaves both replies for replies in neither
answer_diagnosis = "D"

# beta = 0.03 drifted ~40 nats and gold fell: a larger beta (0.3) keeps the policy near pi_ref
answer_beta = "C"

# 6.7  with Adam both runs start alike; beta = 1 wins its 8 pairs at a margin of ~10 nats and its loss stops pushing,
#      beta = 0.1 keeps going: about twice the margin and a larger held-out KL, in every seed
answer_beta_experiment = "A"
