"""Monet-SFT (the Monet-SFT-125K layout: JSON chats with image paths) to mmlatent samples.

A record is `{"data": [turns], "metadata": {"dataset_name", "sample_id"}}`; a turn is `{"role", "content"}`
with text items `{"type": "text", "text"}` and image items `{"type": "image", "image": PATH}`, the path
relative to the dataset root (the folder holding the six subset folders). In assistant turns every
auxiliary image follows a text item that ends in the marker `<abs_vis_token></abs_vis_token>`, and text
that reads something off that image is wrapped in `<observation>…</observation>`.

Mapping: user-turn images become question images (`img0`, …), assistant-turn images auxiliary images
(`aux0`, …); the marker is removed (the stage layout decides where latent blocks go); the answer is the
last `\\boxed{…}` of the last assistant turn (empty when there is none). As in Monet's own preprocessing,
observation tags in an assistant turn before its first auxiliary image are removed (nothing was observed
yet), and the sample must keep at least one observation span.

Skips, counted by reason: `no_observation`, `marker_mismatch` (an aux image without a marker before it, or
marker and image counts that differ), `missing_image_file`, `unbalanced_observation` (from
`validate_sample`), `bad_image`, `bad_record` (a record of another shape). The structure is checked
before any image is read, so a bad record costs no image I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mmlatent.data.convert.common import Converter
from mmlatent.data.convert.images import convert_image
from mmlatent.data.convert.sources import SourceInfo, json_records, resolve_source
from mmlatent.data.sample import OBSERVATION_CLOSE, OBSERVATION_OPEN, ROLES, SampleError
from mmlatent.data.shard_writer import RawSample

MARKER = "<abs_vis_token></abs_vis_token>"
"""Monet's placeholder in the text item before each auxiliary image."""

SUBSETS: tuple[str, ...] = (
    "Visual_CoT", "CogCoM", "ReFocus", "Zebra_CoT_count", "Zebra_CoT_visual_search", "Zebra_CoT_geometry",
)
"""The six subsets of Monet-SFT-125K, one folder each with a `train.json`."""


@dataclass
class MonetConfig:
    """Which Monet-SFT files to convert and how strictly."""

    source: str
    """The dataset root (the folder holding `Visual_CoT/`, `CogCoM/`, …; image paths are relative to it),
    a single JSON file, or a Hub id (`NOVAglow646/Monet-SFT-125K`, downloaded to the HF cache first)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); the commit it resolves to is written to the manifest."""
    files: list[str] = field(default_factory=lambda: ["*/train.json"])
    """Glob patterns of the JSON (array or JSON-lines) files to read, relative to the root; e.g.
    `["Visual_CoT/train.json"]` for one subset."""
    require_observation: bool = True
    """Skip samples left without an observation span (`no_observation`): stages 2 and 3 align there."""
    strip_early_observations: bool = True
    """Remove observation tags that come before the first auxiliary image of their turn (Monet's rule)."""


class MonetConverter(Converter):
    name = "monet"
    config_class = MonetConfig

    def open(self) -> SourceInfo:
        self.source = resolve_source(self.cfg.source, self.cfg.revision, self.cfg.files, download=True)
        return self.source

    def records(self) -> Iterator[tuple[str, int, Any]]:
        for rel in self.source.files:
            for row, record in enumerate(json_records(self.source.url(rel))):
                yield rel, row, record

    def convert(self, record: tuple[str, int, Any], key: str) -> RawSample:
        rel, row, rec = record
        where = f"{rel}#{row}"
        if not isinstance(rec, dict) or not isinstance(rec.get("data"), list) or not rec["data"]:
            raise SampleError("bad_record", f"{where}: expected {{'data': [turns], 'metadata': {{...}}}}", key)
        messages, paths = self._messages(rec["data"], where, key)
        images = {}
        for ref, path in paths.items():  # every structural check has passed: now read the images
            images[ref] = self._image(path, rel, key)
        metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        name, sample_id = str(metadata.get("dataset_name", "")), str(metadata.get("sample_id", row))
        meta = {
            "id": f"{name}:{sample_id}" if name else sample_id,
            "source": "monet",
            "messages": messages,
            "answer": _last_boxed(messages),
            "meta": {"dataset_name": name, "sample_id": sample_id, "file": rel, "row": row},
        }
        return RawSample(key=key, meta=meta, images=images)

    def _image(self, path: str, rel: str, key: str) -> bytes:
        """Image paths are relative to the dataset root; a JSON file's own folder is tried second."""
        root = Path(self.source.root)
        if not (root / path).exists() and (root / rel).parent.joinpath(path).exists():
            root = (root / rel).parent
        return convert_image(path, root, self.images, key, path)

    def _messages(self, turns: list, where: str, key: str) -> tuple[list[dict], dict[str, str]]:
        """The chat in our item format and {ref: image path}; raises SampleError on a bad structure."""
        messages, paths = [], {}
        n_img = n_aux = markers = observations = 0
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise SampleError("bad_record", f"{where}: turn {t} has no role in {ROLES}", key)
            role, content = turn["role"], turn.get("content")
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            if not isinstance(content, list):
                raise SampleError("bad_record", f"{where}: turn {t} content is {type(content).__name__}", key)
            items, aux_seen, previous = [], False, None
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text" and isinstance(item.get("text"), str):
                    text = item["text"]
                    if role == "assistant":
                        markers += text.count(MARKER)
                        text = text.replace(MARKER, "")
                        if not aux_seen and self.cfg.strip_early_observations:
                            text = text.replace(OBSERVATION_OPEN, "").replace(OBSERVATION_CLOSE, "")
                        observations += text.count(OBSERVATION_OPEN)
                    if text.strip():
                        items.append({"type": "text", "text": text})
                elif kind == "image" and isinstance(item.get("image"), str) and item["image"]:
                    if role == "assistant":
                        if not (isinstance(previous, dict) and MARKER in str(previous.get("text", ""))):
                            detail = f"{where}: aux image {n_aux} has no marker before it"
                            raise SampleError("marker_mismatch", detail, key)
                        ref, n_aux, aux_seen = f"aux{n_aux}", n_aux + 1, True
                        items.append({"type": "aux_image", "ref": ref})
                    else:
                        ref, n_img = f"img{n_img}", n_img + 1
                        items.append({"type": "image", "ref": ref})
                    paths[ref] = item["image"]
                else:
                    raise SampleError("bad_record", f"{where}: turn {t} holds an item {str(item)[:80]}", key)
                previous = item
            messages.append({"role": role, "content": items})
        if markers != n_aux:
            raise SampleError("marker_mismatch", f"{where}: {markers} markers but {n_aux} assistant images", key)
        if self.cfg.require_observation and observations == 0:
            raise SampleError("no_observation", f"{where}: no observation span", key)
        return messages, paths


def _last_boxed(messages: list[dict]) -> str:
    """The content of the last `\\boxed{…}` in the last assistant turn (braces balanced), or ""."""
    for message in reversed(messages):
        if message["role"] != "assistant":
            continue
        text = "".join(it["text"] for it in message["content"] if it["type"] == "text")
        start = text.rfind("\\boxed{")
        if start < 0:
            return ""
        depth, i = 0, start + len("\\boxed{") - 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1 : j].strip()
        return ""
    return ""
