"""Multiple-choice answer parsers shared by several benchmarks, each as its source code does it.

- `mmmu_choice`: MMMU's `parse_multi_choice_response` (MMMU).
- `mantis_choice`, `mantis_option`, `mantis_strip`: Mantis `get_prediction`'s letter reading
  (Mantis-Eval, NLVR2; the correctness rule is `mantis_eval.choice_correct`).

MMBench's VLMEvalKit `can_infer` and Q-Bench's lmms-eval matcher live in their own modules.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping, Sequence

UPPER = string.ascii_uppercase


def letters(n: int) -> list[str]:
    """The first `n` option letters: A, B, C, ..."""
    if n > len(UPPER):
        raise ValueError(f"{n} options but only {len(UPPER)} letters")
    return list(UPPER[:n])


def dotted_options(options: Sequence[str]) -> str:
    """`A. x\\nB. y` (LLaVA / ScienceQA / Q-Bench / MMBench layout)."""
    return "\n".join(f"{c}. {o}" for c, o in zip(letters(len(options)), options, strict=True))


def paren_options(options: Sequence[str]) -> str:
    """`(A) x\\n(B) y` (MMMU / BLINK / MVBench layout)."""
    return "\n".join(f"({c}) {o}" for c, o in zip(letters(len(options)), options, strict=True))


# ---------------------------------------------------------------- MMMU (official eval_utils.py)

# The official module calls `random.seed(42)` once at import and draws from the global generator
# in call order; this generator plays that role. Pass your own `rng` for isolation.
MMMU_RNG = random.Random(42)


def mmmu_choice(
    response: str,
    all_choices: Sequence[str],
    index2ans: Mapping[str, str],
    rng: random.Random | None = None,
    letter_forms: Sequence[str] = (" {} ",),
) -> str:
    """MMMU's `parse_multi_choice_response`: `(X)`, then ` X `, then option text, else random.

    `letter_forms`: the bare-letter stages tried in order after `(X)` (lmms-eval's Q-Bench copy
    tries `"X "` then `"X."`); a tie is still broken by the last ` X `, as both do.
    """
    for ch in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(ch)
    response = " " + response + " "  # so that " A " also matches at the ends

    by_content = False
    candidates = [c for c in all_choices if f"({c})" in response]
    with_brackets = bool(candidates)
    for form in letter_forms:
        if candidates:
            break
        candidates = [c for c in all_choices if form.format(c) in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c in all_choices if index2ans[c].lower() in response.lower()]
        by_content = bool(candidates)

    if not candidates:
        return (rng or MMMU_RNG).choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    # Several candidates: the one that occurs last wins (np.argmax keeps the first maximum).
    if by_content:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif with_brackets:
        starts = [response.rfind(f"({c})") for c in candidates]
    else:
        starts = [response.rfind(f" {c} ") for c in candidates]
    return candidates[starts.index(max(starts))]


# ------------------------------------------------------------- Mantis (mantis/benchmark/eval.py)

_MANTIS_PREFIXES = ("final answer:", "the answer is", "answer:")


def mantis_strip(raw: str) -> str:
    """Drop everything up to the first answer prefix ("final answer:", "the answer is", "answer:")."""
    low = raw.lower()
    for prefix in _MANTIS_PREFIXES:
        if prefix in low:
            return raw[low.index(prefix) + len(prefix) :].strip()
    return raw


def mantis_option(answer: str) -> str | None:
    """Mantis `get_option`: "Answer: X", else the first alphabetic character, upper-cased."""
    if re.match(r"Answer: [A-Z]", answer):
        return answer[8]
    for ch in answer:
        if ch.isalpha():
            return ch.upper()
    return None


def mantis_choice(raw: str, n_options: int) -> str:
    """The parsed answer: a valid option letter, or the raw text when no valid letter is found."""
    option = mantis_option(mantis_strip(raw))
    if option and ord(option) - ord("A") < n_options:
        return option
    return raw
