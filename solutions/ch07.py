"""Reference solutions for the chapter 7 exercises (try them yourself first!)."""

import math

import torch

# rewards [1, 0, 0, 3], sum 4: reply i's baseline is the mean of the other three, (4 - r_i) / 3 = [1, 4/3, 4/3, 1/3];
# A = r - baseline (= 4/3 (r - mean) with mean 1)
answer_rloo = [0.0, -4 / 3, -4 / 3, 8 / 3]

# mean 1, deviations [0, -1, -1, 2], squares sum to 6; unbiased std sqrt(6 / 3) = sqrt(2); 2 / (sqrt(2) + 1e-4)
answer_grpo = 2 / (math.sqrt(2) + 1e-4)

# 1 - C(3, 2) / C(5, 2) = 1 - 3/10: the chance that 2 of the 5 samples, drawn without replacement, are not both wrong
answer_pass_at_k = 1 - math.comb(3, 2) / math.comb(5, 2)


def group_advantages(rewards):
    """(r - group mean) / (group std + 1e-4) on (B, K) rewards, exactly 0 for a group of equal rewards."""
    r = rewards.float()
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)  # torch.std: unbiased, divides by K - 1
    # equal rewards found from the rewards themselves: their float mean can differ from them by rounding
    degenerate = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)
    return torch.where(degenerate, torch.zeros_like(adv), adv)


# "grpo" divides each reply's token losses by its own length |y_i|, so one token of a long reply weighs 1/|y_i|:
# a long reply with A < 0 is pushed down less per token than a short one, and lengthening it lowers the penalty.
# A normaliser independent of the reply's length removes it: dr_grpo's constant N * L (or a token mean).
answer_aggregation = "C"

# run_a raises pass@16 too (new prompts solved): widens; run_b raises pass@1 while pass@16 stays flat (slightly
# down): sharpens; run_c lowers pass@1 and pass@16: neither
answer_sharpening = {"run_a": "widens", "run_b": "sharpens", "run_c": "neither"}

# 7.7  with about one reply in five correct, two replies are both wrong most of the time (58-74% of the groups of 2),
#      eight rarely (7-23% of the groups of 8): the same replies in larger groups waste far fewer
answer_group_size_experiment = "B"
