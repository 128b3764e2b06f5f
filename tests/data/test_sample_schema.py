"""The shard sample format: good samples pass, each kind of bad sample fails with its reason code."""

from __future__ import annotations

import copy

import pytest

from mmlatent.data.sample import (
    IMAGE_EXTENSIONS,
    OBSERVATION_CLOSE,
    OBSERVATION_OPEN,
    SampleError,
    image_refs_in_order,
    sample_texts,
    validate_sample,
)


def good_sample() -> dict:
    return {
        "id": "s1",
        "source": "test",
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": "What colour?\nA. red\nB. blue"}],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Look here."},
                    {"type": "aux_image", "ref": "aux0"},
                    {"type": "text", "text": "<observation>It is"},
                    {"type": "text", "text": " red.</observation> The answer is A."},
                ],
            },
        ],
        "answer": "A",
        "choices": ["red", "blue"],
        "meta": {"task": "t"},
    }


REFS = ("img0", "aux0")


def test_good_sample_passes_and_optional_fields_may_be_absent():
    validate_sample(good_sample(), REFS, key="k")
    minimal = good_sample()
    del minimal["choices"], minimal["meta"]
    validate_sample(minimal, REFS)
    # Extra images that no item references are allowed.
    validate_sample(good_sample(), [*REFS, "unused"])


def test_observation_tags_are_what_validation_balances():
    """The validator pairs exactly OBSERVATION_OPEN with OBSERVATION_CLOSE: a span built from them passes, either
    tag alone fails, and look-alike tags are plain text."""
    def with_answer(text: str) -> dict:
        meta = good_sample()
        meta["messages"][ASSISTANT]["content"] = [{"type": "aux_image", "ref": "aux0"}, {"type": "text", "text": text}]
        return meta

    validate_sample(with_answer(f"It is {OBSERVATION_OPEN}red{OBSERVATION_CLOSE}, so A."), REFS)
    for text in (f"It is {OBSERVATION_OPEN}red, so A.", f"It is red{OBSERVATION_CLOSE}, so A.",
                 f"{OBSERVATION_OPEN}{OBSERVATION_OPEN}red{OBSERVATION_CLOSE}{OBSERVATION_CLOSE}"):
        with pytest.raises(SampleError) as info:
            validate_sample(with_answer(text), REFS)
        assert info.value.reason == "unbalanced_observation", text
    for text in ("It is <obs>red, so A.", "It is <Observation>red, so A.", "It is red</observation >."):
        validate_sample(with_answer(text), REFS)


@pytest.mark.parametrize("ext", [*IMAGE_EXTENSIONS, "PNG", "Jpg"])
def test_image_members_with_a_known_extension_are_written(ext: str):
    """An image given as bytes is written as `KEY.<ref>.<ext>` for every extension of IMAGE_EXTENSIONS, given in
    any case (written in lower case)."""
    from mmlatent.data.shard_writer import RawSample, encode_sample

    sample = RawSample("k1", good_sample(), {"img0": b"img", "aux0": b"aux"}, image_ext=ext)
    members = encode_sample(sample)
    assert members[f"img0.{ext.lower()}"] == b"img" and members[f"aux0.{ext.lower()}"] == b"aux"


@pytest.mark.parametrize("ext", ["gif", "bmp", "tiff", "png.gz", ""])
def test_image_members_with_another_extension_are_rejected(ext: str):
    """Any extension outside IMAGE_EXTENSIONS fails as `bad_image`, naming the extension and the allowed ones."""
    from mmlatent.data.shard_writer import RawSample, encode_sample

    sample = RawSample("k1", good_sample(), {"img0": b"img", "aux0": b"aux"}, image_ext=ext)
    with pytest.raises(SampleError) as info:
        encode_sample(sample)
    assert info.value.reason == "bad_image" and repr(ext) in info.value.detail and "webp" in info.value.detail


def _set(path, value):
    """A mutation that sets meta[path...] = value (or deletes it when value is DELETE)."""

    def mutate(meta):
        target = meta
        for p in path[:-1]:
            target = target[p]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


DELETE = object()
USER, ASSISTANT = 1, 2

BAD_CASES = {
    # name: (mutation, expected reason)
    "no id": (_set(["id"], DELETE), "missing_field"),
    "no source": (_set(["source"], DELETE), "missing_field"),
    "no messages": (_set(["messages"], DELETE), "missing_field"),
    "no answer": (_set(["answer"], DELETE), "missing_field"),
    "message without role": (_set(["messages", USER, "role"], DELETE), "missing_field"),
    "message without content": (_set(["messages", USER, "content"], DELETE), "missing_field"),
    "id not str": (_set(["id"], 3), "bad_type"),
    "source not str": (_set(["source"], None), "bad_type"),
    "messages not list": (_set(["messages"], {"role": "user"}), "bad_type"),
    "messages empty": (_set(["messages"], []), "bad_type"),
    "answer not str": (_set(["answer"], 1), "bad_type"),
    "choices not list": (_set(["choices"], "red,blue"), "bad_type"),
    "choices not str": (_set(["choices"], ["red", 2]), "bad_type"),
    "meta not dict": (_set(["meta"], ["task"]), "bad_type"),
    "message not dict": (_set(["messages", USER], "hello"), "bad_type"),
    "content not list": (_set(["messages", USER, "content"], "hello"), "bad_type"),
    "unknown role": (_set(["messages", USER, "role"], "tool"), "bad_role"),
    "item not dict": (_set(["messages", USER, "content", 1], "text"), "bad_item"),
    "unknown item type": (_set(["messages", USER, "content", 1, "type"], "video"), "bad_item"),
    "text item without text": (_set(["messages", USER, "content", 1, "text"], DELETE), "bad_item"),
    "text not str": (_set(["messages", USER, "content", 1, "text"], 5), "bad_item"),
    "image without ref": (_set(["messages", USER, "content", 0, "ref"], DELETE), "bad_item"),
    "ref with a dot": (_set(["messages", USER, "content", 0, "ref"], "img.0"), "bad_item"),
    "ref not resolved": (_set(["messages", USER, "content", 0, "ref"], "img9"), "missing_image"),
    "aux ref not resolved": (_set(["messages", ASSISTANT, "content", 1, "ref"], "aux7"), "missing_image"),
    "duplicate ref": (_set(["messages", ASSISTANT, "content", 1], {"type": "image", "ref": "img0"}), "duplicate_ref"),
    "aux in user turn": (
        _set(["messages", USER, "content", 0], {"type": "aux_image", "ref": "img0"}),
        "aux_outside_assistant",
    ),
    "unclosed observation": (
        _set(["messages", ASSISTANT, "content", 3, "text"], " red. The answer is A."),
        "unbalanced_observation",
    ),
    "close before open": (
        _set(["messages", ASSISTANT, "content", 2, "text"], "</observation>It is <observation>"),
        "unbalanced_observation",
    ),
    "nested observation": (
        _set(["messages", ASSISTANT, "content", 2, "text"], "<observation>It <observation>is"),
        "unbalanced_observation",
    ),
    "observation in user turn": (
        _set(["messages", USER, "content", 1, "text"], "<observation>x</observation>"),
        "unbalanced_observation",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_samples_fail_with_reason(case):
    mutate, reason = BAD_CASES[case]
    meta = copy.deepcopy(good_sample())
    mutate(meta)
    with pytest.raises(SampleError) as info:
        validate_sample(meta, REFS, key="key7")
    err = info.value
    assert err.reason == reason, err
    assert err.key == "key7"
    assert isinstance(err, ValueError)
    assert "key7" in str(err) and reason in str(err) and err.detail in str(err)


def test_missing_image_when_image_absent_and_non_dict_sample():
    with pytest.raises(SampleError) as info:
        validate_sample(good_sample(), ["img0"])
    assert info.value.reason == "missing_image" and "aux0" in info.value.detail
    with pytest.raises(SampleError) as info:
        validate_sample(["not", "a", "dict"], REFS)  # type: ignore[arg-type]
    assert info.value.reason == "bad_type" and info.value.key is None


def test_every_reason_code_is_exercised():
    codes = {reason for _, reason in BAD_CASES.values()}
    assert codes == {
        "missing_field",
        "bad_type",
        "bad_role",
        "bad_item",
        "missing_image",
        "duplicate_ref",
        "aux_outside_assistant",
        "unbalanced_observation",
    }


def test_observation_may_span_items_but_not_turns():
    meta = good_sample()
    # Open in one assistant turn, close in the next: each turn alone is unbalanced.
    meta["messages"][ASSISTANT]["content"][3]["text"] = " red."
    meta["messages"].append({"role": "assistant", "content": [{"type": "text", "text": "</observation>"}]})
    with pytest.raises(SampleError) as info:
        validate_sample(meta, REFS)
    assert info.value.reason == "unbalanced_observation" and "messages[2]" in info.value.detail


def test_image_refs_in_order_and_texts():
    meta = good_sample()
    assert image_refs_in_order(meta) == [("image", "img0"), ("aux_image", "aux0")]
    assert sample_texts(meta) == [
        "Be brief.",
        "What colour?\nA. red\nB. blue",
        "Look here.",
        "<observation>It is",
        " red.</observation> The answer is A.",
    ]
