"""Re-read a published ScienceQA prediction file with an mmlatent protocol and compare letter by letter.

The official scripts save `{"results": {pid: option index}, "outputs": {pid: response}}` (LLaVA's
`eval_science_qa.py --output-result`, the ScienceQA authors' `run_gpt3.py`); LLaVA ships two such files of
its published models (`llava/eval/table/results/`), the ScienceQA repository one of GPT-3
(`results/gpt3/`). For every response this reads the letter with `--protocol` and compares its index with the
recorded one (-1 or a random index where the official code read none). The questions' option counts come
from the authors' `problems.json` when given (`--problems`); without it every letter A–E counts as an option.

    python eval/official_letters.py test_sqa_llava_lcs_558k_sqa_12e_vicuna_v1_3_13b.json --protocol llava

Prints one JSON line: outputs, same (our letter's index is the recorded one), unparsed (we read no letter;
recorded -1, or a random guess where the protocol guesses), and the first differing ids.
"""

from __future__ import annotations

import argparse
import json

from mmlatent.evaluation.protocols import SCIENCEQA_PROTOCOLS
from mmlatent.evaluation.scienceqa_parsing import OFFICIAL_OPTIONS


def compare(results_file: str, protocol: str, problems_file: str | None = None) -> dict:
    with open(results_file, encoding="utf-8") as f:
        saved = json.load(f)
    problems = json.load(open(problems_file, encoding="utf-8")) if problems_file else {}
    p = SCIENCEQA_PROTOCOLS[protocol]
    same, unparsed, unparsed_recorded_minus_one, differ = 0, 0, 0, []
    for pid, response in saved["outputs"].items():
        n = len(problems[pid]["choices"]) if pid in problems else len(OFFICIAL_OPTIONS)
        letter = p.letter(response, [""] * n)
        recorded = int(saved["results"][pid])
        if letter is None:
            unparsed += 1
            unparsed_recorded_minus_one += recorded == -1
            if recorded == -1 or p.guesses:  # the official code read none too: -1, or a guess we cannot redo
                continue
        elif OFFICIAL_OPTIONS.index(letter) == recorded:
            same += 1
            continue
        differ.append(pid)
    return {"file": results_file, "protocol": protocol, "outputs": len(saved["outputs"]), "same": same,
            "unparsed": unparsed, "unparsed_recorded_-1": unparsed_recorded_minus_one, "differ": len(differ),
            "differ_ids": differ[:10], "recorded_acc": saved.get("acc")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_file", help="An official results JSON with `results` and `outputs`.")
    ap.add_argument("--protocol", choices=sorted(SCIENCEQA_PROTOCOLS), default="llava")
    ap.add_argument("--problems", default=None, help="The ScienceQA authors' problems.json (option counts).")
    args = ap.parse_args()
    print(json.dumps(compare(args.results_file, args.protocol, args.problems)))


if __name__ == "__main__":
    main()
