"""Reference solutions for chapter 2 (reward modeling); same names as rlhf_book.exercises.ch02.EXERCISES."""

import math

import torch
import torch.nn.functional as F


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry loss mean(-log sigmoid(r_c - r_r)); (B,), (B,) -> scalar."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# sigmoid(1.2 - 0.5) = sigmoid(0.7)
p_a_over_b = 1 / (1 + math.exp(-0.7))

# sigmoid(d) = 0.9  <=>  d = log(0.9 / 0.1) = log 9
gap_for_90 = math.log(9)


def last_token_scores(scores, attention_mask):
    """Score at the last real (mask 1) column of each row, left or right padding; (B, T), (B, T) -> (B,)."""
    T = attention_mask.size(1)
    cols = torch.arange(T).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), cols, -1).max(-1).values
    return scores[torch.arange(scores.size(0)), last]


# 2.5  length is a stand-in for quality: right when the better reply is longer, worse than chance otherwise
length_diagnosis = "A"

# 2.6  a number that depends only on the prompt is added to both replies of a pair and cancels in r_c - r_r
answer_invariance = "C"
