"""Reference solutions for the chapter 9 exercises (try them yourself first!)."""

import math
import re

# (a) the reference scratchpad ends with "#### 132": accepted; (b) "#### 0132" has a leading zero: not canonical;
# (c) no "#### " line at all; (d) two lines hold ####, which the strict rule refuses (its last line says 133 anyway)
answer_strict = [True, False, False, False]

# the last integer anywhere in the reply, leading zeros allowed: 132, 132 (0132), 132 ("so 132 it is"), 133
answer_lenient = [132, 132, 132, 133]


def strict_answer(reply):
    """The final answer of ``reply`` under the strict rule, or None."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]  # non-blank lines, whitespace around dropped
    if not lines or sum("####" in line for line in lines) != 1:  # exactly one line may hold the marker
        return None
    m = re.fullmatch(r"#### (-?(?:0|[1-9][0-9]*))", lines[-1])  # the whole last line; ASCII digits, no leading zero
    if m is None or m.group(1) == "-0" or len(m.group(1).lstrip("-")) > 40:  # MAX_DIGITS
        return None
    return int(m.group(1))


# 3 reference steps (7 + 5 = 12, 4 + 8 + 1 = 13, 3 + 2 + 1 = 6) -> each line can earn 1/4; the slipped 14 earns 0; the
# next line is still the reference's step (14 carries 1, as 13 does): 1/4; the answer 642 is wrong: 0
answer_step_rewards = [0.25, 0.0, 0.25, 0.0]

# the group's six step rewards (1/3 x4, 0 x2): mean 2/9, unbiased std sqrt(12/405); normalised +0.6451 and -1.2902 with
# eps = 1e-4. A first token is credited with all three steps of its reply: +3 x 0.6451 and 0.6451 - 2 x 1.2902
_std = math.sqrt(12 / 405) + 1e-4
answer_process_advantages = [3 * (1 / 9) / _std, (1 / 9 - 2 * 2 / 9) / _std]

# the strict verifier pays 0 for "#### 9" when the answer is -9, the format reward starts near 1 (not 0.75), a coin stays
# near 0.5: the any-number verifier pays the -9 of the second step, so the last line's sign no longer matters
answer_reward_diagnosis = "D"

# reply 2's steps normalise to +0.645, -1.291, -1.291; a token sums the steps ending at or after it: -1.94 (first step),
# -2.58 (second step), -1.29 (answer): every token pushed down, the wrong second step's the most
answer_process_credit = "A"

# 9.6  the share of degenerate groups falls from K = 2 to K = 8 at both difficulties (add2 62-69% -> 12-20%, mul2
#      76-79% -> 30-38%); at K = 8 mul2 keeps more of them: problems it never solves stay all wrong at any K
answer_degenerate_experiment = "C"
