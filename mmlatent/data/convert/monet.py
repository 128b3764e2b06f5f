"""Monet-SFT (the Monet-SFT-125K layout: JSON chats with image paths) to mmlatent samples, as Monet's own
training code (NOVAglow646/Monet, `src/task.py`, `src/utils.py`) reads them.

A record is `{"data": [turns], "metadata": {"dataset_name", "sample_id"}}`; a turn is `{"role", "content"}`
with text items `{"type": "text", "text"}` and image items `{"type": "image", "image": PATH}`, the path
relative to the dataset root (the folder holding the six subset folders, each with a `train.json`). The
marker `<abs_vis_token></abs_vis_token>` in a turn's text says where that turn's images go: in assistant
turns each auxiliary image follows a text item holding a marker, and a question with several images (`Image
A: <marker> Image B: <marker> …`) marks each one. Text that reads something off an auxiliary image is wrapped
in `<observation>…</observation>`.

Mapping, each step as Monet's preprocessing and collators do it:
- the system turn's text becomes `system_prompt` ("You are a helpful assistant.");
- `\\nPut your final answer within \\boxed{}.` is removed from the question, except in the subsets listed
  in `keep_boxed_instruction` (Monet keeps it for `Zebra_CoT_visual_search` and `Zebra_CoT_count`);
- observation tags in an assistant turn before its first auxiliary image are removed (nothing was observed
  yet), and the sample must keep at least one observation span (`require_observation`);
- in a turn whose text holds markers (every assistant turn with images; a question with several images),
  the i-th image of the turn is placed at the i-th marker and the markers are removed; elsewhere images
  stay where the content list has them. User-turn images become question images (`img0`, …),
  assistant-turn images auxiliary images (`aux0`, …); the stage layout decides what an aux image becomes;
- the answer is the last `\\boxed{…}` of the last assistant turn, normalised (`answers.normalize_answer`).

Sample keys are `monet-<subset>-<metadata.sample_id>` (the subset is the JSON file's folder, as Monet
names its datasets and its teacher caches), or `monet-<subset>-<file>-row-<n>` for a record without an id.

Skips, counted by reason and listed in `skips.jsonl`: `no_observation`, `marker_mismatch` (an aux image
without a marker before it, or marker and image counts that differ in a turn), `missing_image_file`,
`image_outside_root` (a path that leaves `--image_root`, e.g. `../…`), `unbalanced_observation` (from `validate_sample`), `bad_image`, `bad_record` (a record of another shape).
The structure is checked before any image is read, so a bad record costs no image I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator

from mmlatent.data.convert.answers import last_boxed, normalize_answer
from mmlatent.data.convert.common import Converter, Record, make_key
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.input_files import SourceInfo, json_records, resolve_source
from mmlatent.data.sample import OBSERVATION_CLOSE, OBSERVATION_OPEN, ROLES, SampleError
from mmlatent.data.shard_writer import RawSample

MARKER = "<abs_vis_token></abs_vis_token>"
"""Monet's placeholder where an image goes (before each auxiliary image; at each of several question images)."""

BOXED_INSTRUCTION = "\nPut your final answer within \\boxed{}."
"""The instruction Monet removes from the questions of most subsets."""

SUBSETS: tuple[str, ...] = (
    "Visual_CoT", "CogCoM", "ReFocus", "Zebra_CoT_count", "Zebra_CoT_visual_search", "Zebra_CoT_geometry",
)
"""The six subsets of Monet-SFT-125K, one folder each with a `train.json`."""


@dataclass
class MonetConfig:
    """Which Monet-SFT files to convert, where their images are, and how strictly."""

    source: str
    """The dataset root (the folder holding `Visual_CoT/`, `CogCoM/`, …), a single JSON file of it (e.g.
    `ROOT/ReFocus/train.json`), or a Hub id (`NOVAglow646/Monet-SFT-125K`, downloaded to the HF cache first)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    files: list[str] = field(default_factory=lambda: ["*/train.json"])
    """Glob patterns of the JSON (array or JSON-lines) files to read, relative to the root; e.g.
    `["Visual_CoT/train.json"]` for one subset. Ignored when `source` is a single file."""
    image_root: str | None = None
    """The folder image paths are relative to. None: the dataset root, i.e. `source` when it is a folder or
    a Hub id, and the folder above the subset folder when `source` is a single JSON file."""
    require_observation: bool = True
    """Skip samples left without an observation span (`no_observation`): stages 2 and 3 align there."""
    strip_early_observations: bool = True
    """Remove observation tags that come before the first auxiliary image of their turn (Monet's rule)."""
    keep_boxed_instruction: list[str] = field(default_factory=lambda: ["Zebra_CoT_visual_search", "Zebra_CoT_count"])
    """Subsets whose questions keep `\\nPut your final answer within \\boxed{}.`; Monet strips it elsewhere."""
    system_prompt: str | None = "You are a helpful assistant."
    """Text that replaces the system turn's, as Monet's preprocessing does; None keeps the data's."""


class MonetConverter(Converter):
    name = "monet"
    config_class = MonetConfig

    def open(self) -> SourceInfo:
        self.source = resolve_source(self.cfg.source, self.cfg.revision, self.cfg.files, download=True)
        if self.cfg.image_root is not None:
            self.image_root = str(Path(self.cfg.image_root).expanduser())
        elif Path(self.cfg.source).expanduser().is_file():
            self.image_root = str(Path(self.source.root).parent)  # ROOT/SUBSET/train.json -> ROOT
        else:
            self.image_root = self.source.root
        if not Path(self.image_root).is_dir():
            raise FileNotFoundError(f"image_root={self.image_root!r} is not a folder")
        return self.source

    def records(self) -> Iterator[Record]:
        for rel in self.source.files:
            for row, record in enumerate(json_records(self.source.url(rel))):
                yield Record(rel, row, record)

    def key(self, record: Record) -> str:
        metadata = record.data.get("metadata") if isinstance(record.data, dict) else None
        sample_id = metadata.get("sample_id") if isinstance(metadata, dict) else None
        subset = self.folder_name(record.file)
        if sample_id is None or str(sample_id) == "":
            return make_key(self.name, subset, PurePosixPath(record.file).stem, "row", record.row)
        return make_key(self.name, subset, sample_id)

    def hint(self, reason: str) -> str:
        if reason != "missing_image_file":
            return ""
        return (f"Image paths are read relative to image_root={self.image_root}; pass --image_root with the "
                f"folder they are relative to (in Monet-SFT-125K, the dataset root that holds the subset folders)")

    def convert(self, record: Record, key: str) -> RawSample:
        rel, row, rec = record
        where = f"{rel}#{row}"
        if not isinstance(rec, dict) or not isinstance(rec.get("data"), list) or not rec["data"]:
            raise SampleError("bad_record", f"{where}: expected {{'data': [turns], 'metadata': {{...}}}}", key)
        subset = self.folder_name(rel)
        messages, paths = self._messages(rec["data"], subset, where, key)
        images = {ref: convert_image(path, self.image_root, self.images, key, path) for ref, path in paths.items()}
        metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        name, sample_id = str(metadata.get("dataset_name", "")), str(metadata.get("sample_id", row))
        meta = {
            "id": f"{name}:{sample_id}" if name else sample_id,
            "source": "monet",
            "messages": messages,
            "answer": _answer(messages),
            "meta": {"dataset_name": name, "sample_id": sample_id, "subset": subset, "file": rel, "row": row},
        }
        return RawSample(key=key, meta=meta, images=images)

    def _messages(self, turns: list, subset: str, where: str, key: str) -> tuple[list[dict], dict[str, str]]:
        """The chat in our item format and {ref: image path}; raises SampleError on a bad structure."""
        messages, paths = [], {}
        observations = 0
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise SampleError("bad_record", f"{where}: turn {t} has no role in {ROLES}", key)
            role, content = turn["role"], turn.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise SampleError("bad_record", f"{where}: turn {t} content is {type(content).__name__}", key)
            items = self._turn(role, content, subset, paths, f"{where} turn {t}", key)
            if role == "assistant":
                observations += sum(it["text"].count(OBSERVATION_OPEN) for it in items if it["type"] == "text")
            messages.append({"role": role, "content": _place_at_markers(items, f"{where} turn {t}", key)})
        if self.cfg.require_observation and observations == 0:
            raise SampleError("no_observation", f"{where}: no observation span", key)
        return messages, paths

    def _turn(self, role: str, content: list, subset: str, paths: dict[str, str], where: str, key: str) -> list[dict]:
        """One turn's items with Monet's text rules applied (markers still in the text); image paths go to
        `paths` under fresh refs."""
        items: list[dict] = []
        aux_seen = False
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                text = item["text"]
                if role == "system" and j == 0 and self.cfg.system_prompt is not None:
                    text = self.cfg.system_prompt
                elif role == "user" and subset not in self.cfg.keep_boxed_instruction:
                    text = text.replace(BOXED_INSTRUCTION, "")
                elif role == "assistant" and not aux_seen and self.cfg.strip_early_observations:
                    text = text.replace(OBSERVATION_OPEN, "").replace(OBSERVATION_CLOSE, "")
                items.append({"type": "text", "text": text})
            elif kind == "image" and isinstance(item.get("image"), str) and item["image"]:
                if role == "assistant":
                    if items and items[-1]["type"] == "text" and MARKER not in items[-1]["text"]:
                        raise SampleError("marker_mismatch", f"{where}: an aux image has no marker before it", key)
                    aux_seen = True
                prefix, kind = ("aux", "aux_image") if role == "assistant" else ("img", "image")
                ref = f"{prefix}{sum(r.startswith(prefix) for r in paths)}"
                paths[ref] = item["image"]
                items.append({"type": kind, "ref": ref})
            else:
                raise SampleError("bad_record", f"{where}: an item {str(item)[:80]}", key)
        return items


def _place_at_markers(items: list[dict], where: str, key: str) -> list[dict]:
    """A turn whose text holds markers: the i-th image goes to the i-th marker and the markers go (Monet's
    `replace_latent_placeholder_with_img_pad` and `process_multiple_question_img`). A turn without markers
    is returned as it is. Empty text pieces are dropped."""
    images = [it for it in items if it["type"] != "text"]
    n_markers = sum(it["text"].count(MARKER) for it in items if it["type"] == "text")
    if n_markers == 0:
        return [it for it in items if it["type"] != "text" or it["text"]]
    if n_markers != len(images):
        raise SampleError("marker_mismatch", f"{where}: {n_markers} markers but {len(images)} images", key)
    out: list[dict] = []
    queue = iter(images)
    for item in items:
        if item["type"] != "text":
            continue
        for i, piece in enumerate(item["text"].split(MARKER)):
            if i:
                out.append(next(queue))
            if piece:
                out.append({"type": "text", "text": piece})
    return out


def _answer(messages: list[dict]) -> str:
    """The last `\\boxed{…}` of the last assistant turn, normalised; "" when it has none."""
    for message in reversed(messages):
        if message["role"] == "assistant":
            boxed = last_boxed("".join(it["text"] for it in message["content"] if it["type"] == "text"))
            return "" if boxed is None else normalize_answer(boxed)
    return ""
