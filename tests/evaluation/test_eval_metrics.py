"""Breakdowns: MMMU subjects, disciplines and instance-weighted overall; ScienceQA's nine columns."""

from __future__ import annotations

import pytest

from mmlatent.evaluation.metrics import MMMU_DISCIPLINES, mmmu_breakdown, scienceqa_breakdown


def test_mmmu_has_30_subjects_in_six_disciplines():
    subjects = [s for d in MMMU_DISCIPLINES.values() for s in d]
    assert len(MMMU_DISCIPLINES) == 6 and len(subjects) == 30 == len(set(subjects))


def mmmu_record(subject: str, correct: bool, unparsed: bool = False) -> dict:
    return {"subject": subject, "correct": correct, "unparsed": unparsed}


def test_mmmu_breakdown_is_weighted_by_instance():
    records = (
        [mmmu_record("Accounting", True)] * 3 + [mmmu_record("Accounting", False, unparsed=True)]  # 3/4
        + [mmmu_record("Finance", False)]  # 0/1 -> Business 3/5
        + [mmmu_record("Math", True)]  # Science 1/1
    )
    b = mmmu_breakdown(records)
    assert b["overall"] == {"num": 6, "correct": 4, "acc": pytest.approx(4 / 6), "unparsed": 1}  # not mean of 0.6 and 1
    assert list(b["disciplines"]) == ["Business", "Science"]  # official order, empty ones left out
    assert b["disciplines"]["Business"] == {"num": 5, "correct": 3, "acc": pytest.approx(0.6), "unparsed": 1}
    assert list(b["subjects"]) == ["Accounting", "Finance", "Math"]
    assert b["subjects"]["Accounting"]["acc"] == pytest.approx(0.75)


def test_mmmu_hidden_answers_have_no_accuracy():
    b = mmmu_breakdown([{"subject": "Art", "correct": None, "unparsed": True}])
    assert b["overall"] == {"num": 1, "correct": 0, "acc": None, "unparsed": 1}


def sqa(subject, grade, hint, image, correct, unparsed=False):
    return {"subject": subject, "grade": grade, "has_text": hint, "has_image": image,
            "no_context": not hint and not image, "correct": correct, "unparsed": unparsed}


def test_scienceqa_groups_follow_the_official_table():
    records = [
        sqa("natural science", "grade3", False, True, True),
        sqa("natural science", "grade7", True, True, False, unparsed=True),  # TXT and IMG both
        sqa("social science", "grade8", True, False, True),
        sqa("language science", "grade10", False, False, True),
    ]
    g = scienceqa_breakdown(records)["groups"]
    assert list(g) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert (g["NAT"]["num"], g["NAT"]["acc"]) == (2, 0.5)
    assert (g["SOC"]["num"], g["LAN"]["num"]) == (1, 1)
    assert (g["TXT"]["num"], g["TXT"]["correct"]) == (2, 1)
    assert (g["IMG"]["num"], g["IMG"]["correct"], g["IMG"]["unparsed"]) == (2, 1, 1)
    assert (g["NO"]["num"], g["NO"]["acc"]) == (1, 1.0)
    assert (g["G1-6"]["num"], g["G7-12"]["num"], g["G7-12"]["correct"]) == (1, 3, 2)
    assert g["Avg"] == {"num": 4, "correct": 3, "acc": 0.75, "unparsed": 1}


def test_wilson_interval_matches_the_textbook_values():
    from mmlatent.evaluation.metrics import wilson_interval

    assert wilson_interval(40, 100) == pytest.approx([0.3094, 0.4980], abs=1e-4)  # p = 0.4, n = 100
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # stays inside [0, 1] at 0%
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson_interval(0, 0) is None
