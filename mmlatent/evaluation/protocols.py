"""Scoring protocols: which official scorer's rules turn a response into a verdict, named in every result.

Harnesses read different answers out of the same response, so a score means little without the rules that
produced it. Each protocol reproduces one official scorer:

| protocol | task | official code | unparsable answer |
|---|---|---|---|
| `llava` | ScienceQA (default) | LLaVA `llava/eval/eval_science_qa.py` | wrong (`get_pred_idx` returns -1) |
| `scienceqa` | ScienceQA | ScienceQA `models/run_gpt3.py` (`get_gpt3_result`, `get_pred_idx`) | a random option |
| `lmms-eval` | ScienceQA | lmms-eval `tasks/scienceqa/utils.py` (`sqa_process_results`) | wrong (exact_match 0) |
| `mmmu` | MMMU (default), shards | MMMU `mmmu/utils/eval_utils.py` | a random option (seed 42) |
| `lmms-eval` | MMMU | lmms-eval `tasks/_task_utils/mmmu_mcq_utils.py`, `tasks/mmmu/utils.py` | a random option |

Where the official code guesses, the letter it draws depends on its RNG's state (the ScienceQA authors draw
after sampling the few-shot examples; MMMU seeds 42 at import and draws in the order it meets questions), so
no other program can reproduce it. We count such an answer wrong, report it as `unparsed`, and give the
expected accuracy had it been guessed (`acc_if_guessed`): each unparsed answer adds the chance that a
uniform guess over its options is right. The official score lies around that expectation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from mmlatent.benchmarks import QuestionType, choice_letters
from mmlatent.evaluation.parsing import eval_multi_choice, eval_open, parse_multi_choice_response, parse_open_response
from mmlatent.evaluation.scienceqa_parsing import lmms_eval_letter, llava_letter, scienceqa_letter

ProtocolName = Literal["llava", "scienceqa", "lmms-eval", "mmmu"]
"""Names `--protocol` takes (which apply depends on the task)."""


@dataclass(frozen=True)
class Protocol:
    """One official scorer's rules for multiple-choice letters (open questions are always MMMU's)."""

    name: str
    """The name results carry (`results.json` `protocol`)."""
    source: str
    """The official code it follows, as repository, file and function."""
    letter: Callable[[str, list[str]], str | None]
    """(response, option texts) -> the letter the official code reads, or None where it reads none."""
    guesses: bool
    """True where the official code picks a random option for an unparsable answer (we count it wrong)."""


def _mmmu_letter(lmms_eval: bool) -> Callable[[str, list[str]], str | None]:
    def letter(response: str, choices: list[str]) -> str | None:
        letters = choice_letters(len(choices))
        return parse_multi_choice_response(response, letters, dict(zip(letters, choices)), lmms_eval=lmms_eval)

    return letter


SCIENCEQA_PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("llava", "haotian-liu/LLaVA llava/eval/eval_science_qa.py", lambda r, c: llava_letter(r, len(c)), False),
        Protocol("scienceqa", "lupantech/ScienceQA models/run_gpt3.py get_gpt3_result + get_pred_idx",
                 lambda r, c: scienceqa_letter(r, len(c)), True),
        Protocol("lmms-eval", "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/scienceqa/utils.py sqa_process_results",
                 lambda r, c: lmms_eval_letter(r, len(c)), False),
    )
}
"""ScienceQA's protocols, the default (LLaVA's, for the LLaVA / lmms-eval prompt we render) first."""

MMMU_PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("mmmu", "MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py parse_multi_choice_response", _mmmu_letter(False), True),
        Protocol("lmms-eval", "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py "
                 "parse_mmmu_multi_choice_response", _mmmu_letter(True), True),
    )
}
"""MMMU's protocols (also the multiple-choice parser of mmlatent's own shards), the official one first."""


@dataclass
class Judgement:
    """The verdict on one response."""

    prediction: str | None
    """Multiple choice: the parsed letter (None if unparsable). Open: the response itself, the form the
    official submission file takes."""
    correct: bool | None
    """Whether the prediction matches the gold answer; None when the split has no gold answers."""
    unparsed: bool
    """Multiple choice: no letter could be parsed. Open: empty response."""
    parsed: list[str | float] = field(default_factory=list)
    """Open questions: the normalised candidates that were matched against the gold answers."""
    guess_chance: float | None = None
    """Unparsed under a protocol whose official code guesses: the chance its uniform guess is right."""


def judge(
    question_type: QuestionType,
    choices: list[str],
    gold: str | list[str] | None,
    response: str,
    protocol: Protocol = MMMU_PROTOCOLS["mmmu"],
) -> Judgement:
    """Parse `response` as the protocol's official code does and compare it with `gold`."""
    if question_type == "multiple-choice":
        pred = protocol.letter(response, choices)
        correct = None if gold is None else (pred is not None and eval_multi_choice(gold, pred))
        chance = None
        if pred is None and protocol.guesses and gold is not None and choices:
            letters = choice_letters(len(choices))
            chance = sum(eval_multi_choice(gold, x) for x in letters) / len(letters)
        return Judgement(prediction=pred, correct=correct, unparsed=pred is None, guess_chance=chance)
    parsed = parse_open_response(response)
    correct = None if gold is None else eval_open(gold, parsed)
    return Judgement(prediction=response, correct=correct, unparsed=not response.strip(), parsed=parsed)
