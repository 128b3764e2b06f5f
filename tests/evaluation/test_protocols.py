"""Parity with the official scorers, output style by output style.

Each row gives the letter each official scorer reads from a response, worked out by reading its code
(None: the scorer reads no letter; the ScienceQA authors and MMMU then guess at random, LLaVA and lmms-eval
count the answer wrong):
- llava: haotian-liu/LLaVA llava/eval/eval_science_qa.py, the `__main__` loop (`pred_text in args.options`;
  `pred_text[0] in args.options and pred_text[1:3] == ". "`; `re.compile(r'The answer is ([A-Z]).')`
  found exactly once) and `get_pred_idx` (a letter outside `options[:len(choices)]` is -1);
- scienceqa: lupantech/ScienceQA models/run_gpt3.py, `get_gpt3_result` (`.strip()`, then the same pattern
  found exactly once, else "FAILED") and `get_pred_idx` (outside the options: `random.choice`);
- lmms-eval: EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/scienceqa/utils.py, `sqa_process_results`
  (`pred = results[0].strip()`; `pred.lower() == target`; else `pred[0].isupper() and pred[1] == "."`);
- mmmu: MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py, `parse_multi_choice_response` (`(A)`, then ` A `,
  then option text in responses over 5 words, the last mentioned winning; else `random.choice`);
- mmmu/lmms-eval: lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py, `parse_mmmu_multi_choice_response`
  (`(A)`, then `A ` (no space before), then `A.`, then option text; several: ranked by ` A `).
The last two are not ScienceQA scorers; their columns show what the MMMU parser, which ScienceQA used
before, reads from the same outputs.
"""

from __future__ import annotations

import json

import pytest

from mmlatent.evaluation.command import main
from mmlatent.evaluation.protocols import MMMU_PROTOCOLS, SCIENCEQA_PROTOCOLS, judge
from mmlatent.evaluation.runner import rescore
from mmlatent.evaluation.tasks import load_eval_data
from tests.evaluation.test_eval_data import write_scienceqa

FIGURES = ["hyperbole", "euphemism", "oxymoron", "apostrophe"]
WAR = ["The war would last for years.", "The war would end in a draw.", "Both sides would lose.", "The war would be over quickly."]
GREETING = ["Dear Aunt Sue,", "dear Aunt Sue,"]
YES_NO = ["yes", "no"]

COLUMNS = ("llava", "scienceqa", "lmms-eval", "mmmu", "mmmu/lmms-eval")

# response, options, then the letter of each column in COLUMNS
TABLE = [
    # chain of thought, the authors' format: the pattern matches "B." once; lmms-eval's pred[1] is "h";
    # MMMU finds no ` B ` (it is "B.") and, over 5 words, the text of option D ("apostrophe")
    ("The answer is B. BECAUSE: An apostrophe is a figure of speech in which a speaker addresses an absent person.",
     FIGURES, "B", "B", None, "D", "B"),
    ("B", FIGURES, "B", None, "B", "B", "B"),  # a whole letter; no "The answer is"
    ("B.", FIGURES, None, None, "B", "B", "B"),  # LLaVA: not in options, shorter than 3; MMMU strips the "."
    ("(B)", FIGURES, None, None, None, "B", "B"),  # only MMMU reads brackets
    ("A. hyperbole", FIGURES, "A", None, "A", None, "A"),  # "A. " prefix; MMMU: no " A ", 2 words
    # MMMU strips the final "." and then the option text (which has it) no longer matches
    ("D. The war would be over quickly.", WAR, "D", None, "D", None, "D"),
    # the article "A" opening the explanation's second sentence: MMMU reads it as option A
    ("The answer is B. A magnet can pull a paper clip.", FIGURES, "B", "B", None, "A", "A"),
    ("A magnet can pull a paper clip.", FIGURES, None, None, None, "A", "A"),  # LLaVA needs "A. ", lmms-eval "A."
    # options that differ only in case: no official ScienceQA scorer reads option text; MMMU matches both
    # case-insensitively at the same place and np.argmax keeps the first
    ("The greeting should be written as dear Aunt Sue, with a small d.", GREETING, None, None, None, "A", "A"),
    # "no" inside "Knowing": MMMU's text match finds option B inside another word
    ("The answer is A. Knowing the facts helps.", YES_NO, "A", "A", None, "B", "A"),
    ("", FIGURES, None, None, None, None, None),  # empty output
    # two letters: the pattern found twice is "FAILED"; MMMU keeps the last bare letter
    ("The answer is A. The answer is B.", FIGURES, None, None, None, "B", "B"),
    ("A or B", FIGURES, None, None, None, "B", "B"),
    # the pattern's "." needs a character after the letter; MMMU pads with spaces
    ("The answer is B", FIGURES, None, None, None, "B", "B"),
    ("The answer is (B).", FIGURES, None, None, None, "B", "B"),  # "(" is not [A-Z]
    ("b", FIGURES, None, None, "B", None, None),  # lmms-eval compares in lower case; the others are case-sensitive
    (" B", FIGURES, None, None, "B", "B", "B"),  # LLaVA does not strip
    ("E", FIGURES, None, None, None, None, None),  # a letter past the options: get_pred_idx gives -1 / guesses
    ("The answer is E.", WAR[:3], None, None, None, None, None),
]


def letters_of(response: str, options: list[str]) -> tuple[str | None, ...]:
    p = {**SCIENCEQA_PROTOCOLS, "mmmu": MMMU_PROTOCOLS["mmmu"], "mmmu/lmms-eval": MMMU_PROTOCOLS["lmms-eval"]}
    return tuple(p[name].letter(response, options) for name in COLUMNS)


@pytest.mark.parametrize("row", TABLE, ids=[repr(row[0][:40]) for row in TABLE])
def test_each_protocol_reads_the_official_letter(row):
    response, options, *expected = row
    assert dict(zip(COLUMNS, letters_of(response, options))) == dict(zip(COLUMNS, expected))


@pytest.mark.parametrize(
    "gold, response, correct, candidates",
    [
        # eval_utils.parse_open_response lower-cases before it splits sentences on r"\.\s(?=[A-Z])|\n", so
        # only newlines split; each line keeps its shortest tail after an indicator ("is ", "answer ", ...)
        ("5", "The answer is 5.\nSo it is 6", True, [5.0, 6.0]),
        ("7", "Two sentences. So the answer is 7", True, [7.0]),
        ("4", "four", False, ["four"]),  # no number in it: a string never equals a numeric gold answer
        ("25%", "about 25%", True, ["about 25%", 25.0]),  # "25%" is no number: a substring match
        ("Paris", "", False, [""]),  # empty: the whole (empty) response is the one candidate
        (["1/2", "0.5"], "so x = .5", True, [0.5]),  # any acceptable answer; "=" counts in the last line (".5" is shorter)
    ],
)
def test_mmmu_open_questions_follow_the_official_parser(gold, response, correct, candidates):
    for protocol in MMMU_PROTOCOLS.values():  # lmms-eval 0.7.3 scores open questions with the same functions
        verdict = judge("open", [], gold, response, protocol)
        assert verdict.correct is correct and verdict.parsed == candidates and verdict.prediction == response


def test_random_fallback_is_counted_wrong_with_its_chance():
    """Where the official code guesses (MMMU: random.choice(all_choices); the ScienceQA authors:
    random.choice(range(len(choices)))), the answer is wrong and carries the chance of a right guess."""
    mmmu = MMMU_PROTOCOLS["mmmu"]
    v = judge("multiple-choice", FIGURES, "B", "I cannot tell", mmmu)
    assert (v.prediction, v.correct, v.unparsed, v.guess_chance) == (None, False, True, 0.25)
    assert judge("multiple-choice", FIGURES, ["A", "B"], "no idea", mmmu).guess_chance == 0.5
    assert judge("multiple-choice", FIGURES, "B", "(B)", mmmu).guess_chance is None  # parsed: no guess
    assert judge("multiple-choice", FIGURES, None, "no idea", mmmu).guess_chance is None  # no gold: unscored
    assert judge("multiple-choice", YES_NO, "A", "B.", SCIENCEQA_PROTOCOLS["scienceqa"]).guess_chance == 0.5
    for name in ("llava", "lmms-eval"):  # these count it wrong, no guess
        v = judge("multiple-choice", YES_NO, "A", "(A)", SCIENCEQA_PROTOCOLS[name])
        assert v.unparsed and v.correct is False and v.guess_chance is None


# fixture questions (tests/evaluation/test_eval_data.py): test_0 gold B of 2 (image, grade 3, NAT),
# test_1 gold A of 3 (hint, grade 8, SOC), test_2 gold C of 3 (no context, grade 10, LAN),
# test_3 gold A of 2 (image and hint, grade 7, NAT)
RESPONSES = {"test_0": "B", "test_1": "The answer is A. BECAUSE: Ohio is a state.", "test_2": "C.", "test_3": "(A)"}
EXPECTED = {  # protocol: (correct, unparsed, acc_if_guessed, the printed NAT/SOC/LAN/TXT/IMG/NO/G1-6/G7-12/Avg)
    "llava": (2, 2, None, "50.00  100.00 0.00   50.00  50.00  0.00   100.00 33.33  50.00"),
    "scienceqa": (1, 3, (1 + 0.5 + 1 / 3 + 0.5) / 4, "0.00   100.00 0.00   50.00  0.00   0.00   0.00   33.33  25.00"),
    "lmms-eval": (2, 2, None, "50.00  0.00   100.00 0.00   50.00  100.00 100.00 33.33  50.00"),
}


@pytest.mark.parametrize("protocol", sorted(EXPECTED))
def test_rescoring_saved_outputs_prints_the_official_breakdown(tmp_path, capsys, protocol):
    root = write_scienceqa(tmp_path / "sqa", "data")
    responses = tmp_path / "r.jsonl"
    responses.write_text("".join(json.dumps({"id": k, "response": v}) + "\n" for k, v in RESPONSES.items()))
    main(["--task", "scienceqa", "--data", str(root), "--responses", str(responses), "--protocol", protocol,
          "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.strip().splitlines()
    correct, unparsed, guessed, row = EXPECTED[protocol]
    assert lines[0].startswith(f"scienceqa test (full), protocol {protocol}: ")
    assert lines[1].split() == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert lines[2].split() == row.split()
    summary = json.loads(lines[-1])
    assert (summary["protocol"], summary["correct"], summary["unparsed"]) == (protocol, correct, unparsed)
    assert summary.get("acc_if_guessed") == (pytest.approx(guessed) if guessed is not None else None)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["protocol"] == protocol and results["protocol_source"] == SCIENCEQA_PROTOCOLS[protocol].source


def test_a_protocol_of_another_task_is_a_clear_error(tmp_path, capsys):
    root = write_scienceqa(tmp_path / "sqa", "data")
    with pytest.raises(SystemExit) as err:
        main(["--task", "scienceqa", "--data", str(root), "--responses", "r.jsonl", "--protocol", "mmmu",
              "--output", str(tmp_path / "o")])
    assert err.value.code == 2
    assert "--protocol 'mmmu' does not apply to scienceqa; choose from ['llava', 'scienceqa', 'lmms-eval']" in capsys.readouterr().err


def test_scienceqa_defaults_to_llava_not_to_the_mmmu_parser(tmp_path):
    data = load_eval_data("scienceqa", str(write_scienceqa(tmp_path / "sqa", "data")), "test", cache_dir=str(tmp_path / "c"))
    assert data.task.protocol.name == "llava"
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "test_2", "response": "The answer is C. A dog is a thing."}) + "\n")
    results = rescore(data, path, tmp_path / "o")
    [record] = [json.loads(x) for x in (tmp_path / "o" / "samples.jsonl").read_text().splitlines()]
    assert record["prediction"] == "C" and results["correct"] == 1  # the MMMU parser reads the article: A
    assert MMMU_PROTOCOLS["mmmu"].letter(record["response"], ["run", "quick", "dog"]) == "A"
