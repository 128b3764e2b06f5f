"""Accuracy breakdowns over scored output lines, in the official scorers' groupings.

MMMU: per subject, per discipline (the six of the paper, each a fixed list of subjects) and overall, all
micro-averaged (weighted by instance: correct ÷ questions), as `main_eval_only.py` computes them.
ScienceQA: NAT / SOC / LAN by subject, TXT / IMG / NO by context (a question with a hint and an image
counts in both TXT and IMG, as in the official `get_scores`), G1-6 / G7-12 by grade, and Avg.
Every group also counts its unparsed answers. Accuracies are fractions, unrounded; rounding is for display.
The trade-off: groups are computed from the written `samples.jsonl` fields, not from the dataset, so a
re-scored or merged file breaks down the same way without the data at hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

MMMU_DISCIPLINES: dict[str, tuple[str, ...]] = {
    "Art & Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health & Medicine": (
        "Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
        "Public_Health",
    ),
    "Humanities & Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech & Engineering": (
        "Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics", "Energy_and_Power",
        "Materials", "Mechanical_Engineering",
    ),
}
"""The six MMMU disciplines and their 30 subjects (the official DOMAIN_CAT2SUB_CAT, in its order)."""

MMMU_SUBJECT_DISCIPLINE: dict[str, str] = {s: d for d, subjects in MMMU_DISCIPLINES.items() for s in subjects}
"""Subject (as in MMMU ids, e.g. `Clinical_Medicine`) -> its discipline."""

SCIENCEQA_SUBJECTS: dict[str, str] = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
"""ScienceQA `subject` values -> their group names."""

SCIENCEQA_GROUPS: tuple[str, ...] = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
"""The columns of ScienceQA's results table, in order."""


@dataclass
class Tally:
    """Counts of one group."""

    num: int = 0
    """Questions in the group."""
    scored: int = 0
    """Questions with a gold answer (a hidden-answer split has none)."""
    correct: int = 0
    """Questions answered correctly."""
    unparsed: int = 0
    """Questions whose response could not be parsed (counted wrong)."""

    def add(self, record: dict[str, Any]) -> None:
        self.num += 1
        self.unparsed += bool(record.get("unparsed"))
        if record.get("correct") is not None:
            self.scored += 1
            self.correct += bool(record["correct"])

    @property
    def acc(self) -> float | None:
        """correct ÷ scored; None when nothing could be scored."""
        return self.correct / self.scored if self.scored else None

    def as_dict(self) -> dict[str, Any]:
        return {"num": self.num, "correct": self.correct, "acc": self.acc, "unparsed": self.unparsed}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> list[float] | None:
    """The Wilson score interval [low, high] of an accuracy `correct / n` (95% for the default z); None for n = 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0% or 100% and for small n.
    """
    if n <= 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def tally(records: Iterable[dict[str, Any]], groups_of: Callable[[dict[str, Any]], Iterable[str]]) -> dict[str, Tally]:
    """One `Tally` per group name; `groups_of(record)` names the groups a record counts in (0, 1 or more)."""
    out: dict[str, Tally] = {}
    for record in records:
        for name in groups_of(record):
            out.setdefault(name, Tally()).add(record)
    return out


def overall(records: Iterable[dict[str, Any]]) -> Tally:
    return tally(records, lambda r: ("all",)).get("all", Tally())


def mmmu_breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"overall", "disciplines": {name: …}, "subjects": {name: …}}`, in the official order; groups with
    no question are left out (as the official script skips them). Unknown subjects count only overall."""
    subjects = tally(records, lambda r: (r["subject"],))
    disciplines = tally(records, lambda r: [d for d in [MMMU_SUBJECT_DISCIPLINE.get(r["subject"])] if d])
    known = [s for d in MMMU_DISCIPLINES.values() for s in d]
    ordered_subjects = known + sorted(set(subjects) - set(known))
    return {
        "overall": overall(records).as_dict(),
        "disciplines": {d: disciplines[d].as_dict() for d in MMMU_DISCIPLINES if d in disciplines},
        "subjects": {s: subjects[s].as_dict() for s in ordered_subjects if s in subjects},
    }


def scienceqa_groups(record: dict[str, Any]) -> list[str]:
    """The ScienceQA groups one record counts in."""
    groups = []
    if record["subject"] in SCIENCEQA_SUBJECTS:
        groups.append(SCIENCEQA_SUBJECTS[record["subject"]])
    groups += [name for name, flag in (("TXT", "has_text"), ("IMG", "has_image"), ("NO", "no_context")) if record[flag]]
    grade = str(record["grade"])
    number = int(grade[len("grade"):]) if grade.startswith("grade") and grade[len("grade"):].isdigit() else None
    if number is not None and 1 <= number <= 6:
        groups.append("G1-6")
    elif number is not None and 7 <= number <= 12:
        groups.append("G7-12")
    groups.append("Avg")
    return groups


def scienceqa_breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"overall", "groups": {NAT, SOC, LAN, TXT, IMG, NO, G1-6, G7-12, Avg}}`; empty groups have num 0."""
    groups = tally(records, scienceqa_groups)
    return {
        "overall": overall(records).as_dict(),
        "groups": {g: groups.get(g, Tally()).as_dict() for g in SCIENCEQA_GROUPS},
    }


def _percent(tally: dict[str, Any]) -> str:
    """An accuracy as the official tables print it (two decimals, in %); `-` for an empty group."""
    return "-" if tally["acc"] is None else f"{100 * tally['acc']:.2f}"


def breakdown_table(results: dict[str, Any]) -> str:
    """The results' breakdown as the official scripts print it, in %, headed by the protocol: ScienceQA's
    `get_scores` row (NAT … Avg); MMMU's disciplines, each with its subjects, and the overall score; for
    shards each group, one per line."""
    head = f"{results['task']} {results['split']} ({results['subset']}), protocol {results['protocol']}: {results['protocol_source']}"
    b = results["breakdown"]
    if "groups" in b:
        names = list(b["groups"])
        width = max(7, *(len(n) + 2 for n in names))
        return "\n".join([head, "".join(n.ljust(width) for n in names),
                          "".join(_percent(b["groups"][n]).ljust(width) for n in names)])
    subjects = dict(b.get("subjects", {}))
    rows = []
    for key, groups in b.items():
        if key in ("overall", "subjects"):
            continue
        for name, t in groups.items():
            if key != "disciplines":
                rows.append((f"{key}: {name}", t))
                continue
            rows.append((name, t))  # MMMU: each discipline, then its subjects (the official printable_results)
            rows += [(f"  {s}", subjects.pop(s)) for s in MMMU_DISCIPLINES.get(name, ()) if s in subjects]
    rows += [(f"  {s}", t) for s, t in subjects.items()] + [("Overall", b["overall"])]
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join([head] + [f"{name.ljust(width)}{_percent(t).rjust(7)}  ({t['num']})" for name, t in rows])
