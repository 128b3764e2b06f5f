"""ScienceQA answer letters, one function per official scorer, each following its code rule for rule.

Published ScienceQA numbers come from three scorers that read different letters out of the same response:
- `llava_letter`: LLaVA's `llava/eval/eval_science_qa.py` (the `__main__` loop and `get_pred_idx`): the
  whole response is a letter (`B`); else it starts with a letter, a period and a space (`B. text`); else
  the pattern `The answer is ([A-Z]).` occurs exactly once. Nothing is stripped first, so `B.` and `(B)`
  give no letter.
- `scienceqa_letter`: the ScienceQA authors' `models/run_gpt3.py` (`get_gpt3_result`): the response is
  stripped, then `The answer is ([A-Z]).` must occur exactly once, for chain-of-thought outputs such as
  `The answer is B. BECAUSE: …`. The `.` in the pattern is any character but a newline, so the letter must be
  followed by one (`The answer is B` at the very end gives none).
- `lmms_eval_letter`: lmms-eval's `tasks/scienceqa/utils.py` (`sqa_process_results`): the stripped response
  equals a letter in any case (`b`), or starts with an upper-case letter and a period (`B.`, `B.C`).
A letter outside the question's options is no letter (both official `get_pred_idx` functions map it like an
unparsable answer). What each official scorer then does with an unparsable answer (LLaVA and lmms-eval:
wrong; the ScienceQA authors: a random option) is the protocol's business (`protocols.py`).
"""

from __future__ import annotations

import re

OFFICIAL_OPTIONS = "ABCDE"
"""The letters both official scripts accept (`--options` default ["A", "B", "C", "D", "E"]), cut to the
question's number of choices (`options[:len(choices)]`)."""

THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
"""The official pattern, unescaped period and all (LLaVA's and the ScienceQA authors' code alike)."""


def _valid(letter: str | None, n_choices: int) -> str | None:
    """`letter` if it names one of the question's options, else None (`get_pred_idx`'s membership test)."""
    return letter if letter is not None and letter in OFFICIAL_OPTIONS[:n_choices] else None


def the_answer_is(response: str) -> str | None:
    """The letter of the single `The answer is X.` in `response`; None for none or several."""
    found = THE_ANSWER_IS.findall(response)
    return found[0] if len(found) == 1 else None


def llava_letter(response: str, n_choices: int) -> str | None:
    """The letter LLaVA's `eval_science_qa.py` reads from `response` (None: its "FAILED", scored -1)."""
    if len(response) == 1 and response in OFFICIAL_OPTIONS:  # `pred_text in args.options`: a whole letter
        letter = response
    elif len(response) >= 3 and response[0] in OFFICIAL_OPTIONS and response[1:3] == ". ":
        letter = response[0]
    else:
        letter = the_answer_is(response)
    return _valid(letter, n_choices)


def scienceqa_letter(response: str, n_choices: int) -> str | None:
    """The letter the ScienceQA authors' `run_gpt3.py` reads from `response` (None: its "FAILED")."""
    return _valid(the_answer_is(response.strip()), n_choices)


def lmms_eval_letter(response: str, n_choices: int) -> str | None:
    """The letter lmms-eval's `sqa_process_results` compares with the target (None: scored 0)."""
    pred = response.strip()
    letters = [chr(ord("A") + i) for i in range(n_choices)]  # `sqa_doc_to_target`'s options
    for letter in letters:  # `pred.lower() == target`, the target being the gold letter in lower case
        if pred.lower() == letter.lower():
            return letter
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":  # `pred[0].lower() == target`
        return next((letter for letter in letters if pred[0].lower() == letter.lower()), None)
    return None
