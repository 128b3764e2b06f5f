"""The sample format of mmlatent shards (DESIGN §2) and its validation.

One sample is a chat whose turns interleave text items and image references:

    {"id": str, "source": str, "answer": str, "choices": [str]?, "meta": {...}?,
     "messages": [{"role": "system" | "user" | "assistant",
                   "content": [{"type": "text", "text": str}
                               | {"type": "image", "ref": "img0"}        # a question image
                               | {"type": "aux_image", "ref": "aux0"}]}]} # an image inside the reasoning

Each `ref` names a tar member `KEY.<ref>.<ext>` of the same sample. Assistant text may hold
`<observation>…</observation>` spans (what the reasoning read off an image). An optional
`"regions": {"aux0": {"image": "img0", "box": [x0, y0, x1, y1]}, …}` says which part of a question image
(box in [0, 1] image units) an aux image is about, and the key `"answer"` which part the answer is read from;
the grounding losses train thoughts (or the LM's attention) to look there.

`validate_sample` is the single gate used both when shards are written and when they are read. It checks
structure, not meaning, and raises `SampleError` with a short stable `reason` code so callers can count
skips by reason. The trade-off: it walks the whole chat (a few microseconds per sample) on every read
instead of trusting the writer, because shards also come from converters and from other people's tools.
"""

from __future__ import annotations

import re
from typing import Collection

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
"""Extensions of tar members that hold images (lower case; readers compare case-insensitively)."""

OBSERVATION_OPEN = "<observation>"
OBSERVATION_CLOSE = "</observation>"

ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""Allowed message roles."""

ITEM_TYPES: tuple[str, ...] = ("text", "image", "aux_image")
"""Allowed content item types."""

REF_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
"""A ref becomes part of a tar member name (`KEY.<ref>.png`), so it may not hold dots, slashes or spaces."""

_OBSERVATION_TAG = re.compile(re.escape(OBSERVATION_OPEN) + "|" + re.escape(OBSERVATION_CLOSE))


class SampleError(ValueError):
    """A sample that breaks the format. `reason` is a short stable code used for skip counts."""

    def __init__(self, reason: str, detail: str, key: str | None = None, path: str | None = None):
        self.reason = reason
        """Stable code, e.g. "missing_image"; the key of skip counters."""
        self.detail = detail
        """Human-readable explanation (which field, which ref)."""
        self.key = key
        """Sample key when known."""
        self.path = path
        """The file path or column involved (an image a converter could not read), when there is one."""
        super().__init__(f"sample {key if key is not None else '?'}: {reason}: {detail}")


def validate_sample(meta: dict, image_refs: Collection[str], key: str | None = None) -> None:
    """Raise `SampleError` unless `meta` (a sample's JSON) is well-formed and every ref is in `image_refs`.

    `image_refs` are the refs of the images the sample carries (member names without key and extension).
    Images that no item references are allowed (they are ignored downstream).
    """

    def fail(reason: str, detail: str) -> SampleError:
        return SampleError(reason, detail, key)

    if not isinstance(meta, dict):
        raise fail("bad_type", f"sample JSON is {type(meta).__name__}, expected an object")
    for name, typ in (("id", str), ("source", str), ("messages", list), ("answer", str)):
        if name not in meta:
            raise fail("missing_field", f"no '{name}'")
        if not isinstance(meta[name], typ):
            raise fail("bad_type", f"'{name}' is {type(meta[name]).__name__}, expected {typ.__name__}")
    if not meta["messages"]:
        raise fail("bad_type", "'messages' is empty")
    if "choices" in meta and not (
        isinstance(meta["choices"], list) and all(isinstance(c, str) for c in meta["choices"])
    ):
        raise fail("bad_type", "'choices' must be a list of strings")
    if "meta" in meta and not isinstance(meta["meta"], dict):
        raise fail("bad_type", f"'meta' is {type(meta['meta']).__name__}, expected an object")

    available = set(image_refs)
    seen_refs: set[str] = set()
    for m, message in enumerate(meta["messages"]):
        role = _check_message(message, m, fail)
        texts: list[str] = []
        for i, item in enumerate(message["content"]):
            where = f"messages[{m}].content[{i}]"
            _check_item(item, where, fail)
            if item["type"] == "text":
                texts.append(item["text"])
                continue
            ref = item["ref"]
            if item["type"] == "aux_image" and role != "assistant":
                raise fail("aux_outside_assistant", f"{where}: aux_image '{ref}' in a {role} turn")
            if ref in seen_refs:
                raise fail("duplicate_ref", f"{where}: ref '{ref}' used twice")
            seen_refs.add(ref)
            if ref not in available:
                raise fail("missing_image", f"{where}: no image for ref '{ref}'")
        _check_observations("".join(texts), role, f"messages[{m}]", fail)
    if "regions" in meta:
        _check_regions(meta["regions"], meta["messages"], fail)


def _check_message(message: object, m: int, fail) -> str:
    """Check one message's shape; return its role."""
    if not isinstance(message, dict):
        raise fail("bad_type", f"messages[{m}] is {type(message).__name__}, expected an object")
    for name in ("role", "content"):
        if name not in message:
            raise fail("missing_field", f"messages[{m}] has no '{name}'")
    role = message["role"]
    if role not in ROLES:
        raise fail("bad_role", f"messages[{m}].role is {role!r}, expected one of {ROLES}")
    if not isinstance(message["content"], list):
        raise fail("bad_type", f"messages[{m}].content is {type(message['content']).__name__}, expected a list")
    return role


def _check_item(item: object, where: str, fail) -> None:
    """Check one content item's shape (type known, its field present and well-typed)."""
    if not isinstance(item, dict):
        raise fail("bad_item", f"{where} is {type(item).__name__}, expected an object")
    kind = item.get("type")
    if kind not in ITEM_TYPES:
        raise fail("bad_item", f"{where}.type is {kind!r}, expected one of {ITEM_TYPES}")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise fail("bad_item", f"{where}: text item without a string 'text'")
        return
    ref = item.get("ref")
    if not isinstance(ref, str) or not REF_PATTERN.match(ref):
        raise fail("bad_item", f"{where}: {kind} item needs a 'ref' of letters, digits, '_' or '-', got {ref!r}")


def _check_observations(text: str, role: str, where: str, fail) -> None:
    """Observation tags: only in assistant turns, balanced, never nested."""
    depth = 0
    for match in _OBSERVATION_TAG.finditer(text):
        if role != "assistant":
            raise fail("unbalanced_observation", f"{where}: observation tag in a {role} turn")
        depth += 1 if match.group() == OBSERVATION_OPEN else -1
        if depth not in (0, 1):
            what = "nested" if depth > 1 else "closed before it was opened"
            raise fail("unbalanced_observation", f"{where}: observation {what} at offset {match.start()}")
    if depth:
        raise fail("unbalanced_observation", f"{where}: observation opened and never closed")


def _check_regions(regions: object, messages: list, fail) -> None:
    """`regions`: {aux ref or "answer": {"image": question image ref, "box": [x0, y0, x1, y1]}}, box in [0, 1]
    image units."""
    if not isinstance(regions, dict):
        raise fail("bad_regions", f"'regions' is {type(regions).__name__}, expected an object")
    kinds = {item["ref"]: item["type"] for message in messages for item in message["content"] if item["type"] != "text"}
    for ref, region in regions.items():
        if kinds.get(ref) != "aux_image" and ref != "answer":
            raise fail("bad_regions", f"regions['{ref}']: not an aux_image of the sample (nor 'answer')")
        if not isinstance(region, dict) or kinds.get(region.get("image")) != "image":
            raise fail("bad_regions", f"regions['{ref}'].image must name a question image of the sample")
        box = region.get("box")
        ok = isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise fail("bad_regions", f"regions['{ref}'].box must be [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")


def image_refs_in_order(meta: dict) -> list[tuple[str, str]]:
    """[(item type "image" or "aux_image", ref)] in message order. Assumes a validated sample."""
    return [
        (item["type"], item["ref"])
        for message in meta["messages"]
        for item in message["content"]
        if item["type"] != "text"
    ]


def sample_texts(meta: dict) -> list[str]:
    """All text items in message order (for tokenizer training corpora). Assumes a validated sample."""
    return [item["text"] for message in meta["messages"] for item in message["content"] if item["type"] == "text"]
