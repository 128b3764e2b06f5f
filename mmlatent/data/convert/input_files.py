"""Where converter input comes from: a local folder or a Hub dataset repository, read as a stream.

`resolve_source` turns `--source` into a `SourceInfo`: the sorted list of the files a converter wants
(matched by glob patterns), their sizes, and the revision. A Hub id is pinned to the commit it resolves
to, so a conversion that is resumed tomorrow reads the same bytes as today, and the manifest can name the
revision. Parquet files of a Hub repository are then streamed through `hf://` URLs; a source that also
needs loose files (Monet-SFT's images) is downloaded with `snapshot_download` first.

Readers never hold a corpus in memory:
- `parquet_rows` reads one parquet file with `datasets` in streaming mode and with image decoding off, so
  image columns arrive as `{"bytes", "path"}` structs and are decoded later, in the worker processes. Files
  are read one at a time because the files of one corpus may have different columns (Zebra-CoT's
  categories have different numbers of image columns).
- `json_records` reads a top-level JSON array (Monet-SFT's `train.json`) or JSON lines incrementally with
  `json.JSONDecoder.raw_decode`, holding one record and one read buffer at a time. The trade-off: records
  are parsed in pure Python (about as fast as `json.load`), instead of `datasets`' JSON builder, which
  loads a whole top-level array into memory at once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""What a Hub dataset id looks like (`owner/name`)."""


@dataclass
class SourceInfo:
    """A resolved input: where its files are, which revision, which files."""

    path: str
    """`--source` as given (a folder, a file, or a Hub id)."""
    kind: Literal["local", "hub"]
    """Local folder or Hub dataset repository."""
    revision: str | None
    """Hub commit sha the conversion is pinned to (None for a local folder unless given)."""
    root: str
    """Local folder, or `hf://datasets/OWNER/NAME@SHA` when files are streamed from the Hub."""
    files: list[str] = field(default_factory=list)
    """Matched files, relative POSIX paths under `root`, sorted."""
    sizes: list[int] = field(default_factory=list)
    """Byte size of each file (part of the identity a resumed conversion must match)."""

    def url(self, rel: str) -> str:
        """Path or URL of file `rel`, as `datasets` and `open` accept it."""
        return f"{self.root}/{rel}" if self.root.startswith("hf://") else str(Path(self.root) / rel)

    def describe(self) -> dict:
        """The manifest's `source` entry."""
        return {
            "path": self.path,
            "kind": self.kind,
            "revision": self.revision,
            "files": [{"path": f, "bytes": s} for f, s in zip(self.files, self.sizes)],
        }


def glob_match(rel: str, pattern: str) -> bool:
    """Whether relative POSIX path `rel` matches `pattern`: `*`, `?`, `[..]` within one segment, `**` any."""

    def match(parts: list[str], pats: list[str]) -> bool:
        if not pats:
            return not parts
        if pats[0] == "**":
            return any(match(parts[i:], pats[1:]) for i in range(len(parts) + 1))
        return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and match(parts[1:], pats[1:])

    return match(rel.split("/"), pattern.strip("/").split("/"))


def _matches(rel: str, patterns: list[str]) -> bool:
    return any(glob_match(rel, p) for p in patterns)


def resolve_source(source: str, revision: str | None, patterns: list[str], *, download: bool = False) -> SourceInfo:
    """Resolve `source` (local folder or file, or Hub dataset id) and list the files matching `patterns`.

    `download=True` fetches a Hub repository's snapshot (all files) into the Hugging Face cache and reads it
    locally; otherwise Hub files are streamed. Raises `FileNotFoundError` when nothing matches.
    """
    if not source:
        raise ValueError("source is empty: give a local folder or a Hub dataset id")
    local = Path(source).expanduser()
    if local.is_file():
        info = SourceInfo(source, "local", revision, str(local.parent), [local.name], [local.stat().st_size])
    elif local.is_dir():
        info = _local(source, local, revision, patterns)
    elif HUB_ID.match(source):
        info = _hub(source, revision, patterns, download)
    else:
        raise FileNotFoundError(f"source={source!r} is neither an existing path nor a Hub dataset id (owner/name)")
    if not info.files:
        raise FileNotFoundError(f"source={source!r}: no file matches {patterns}")
    return info


def _local(source: str, root: Path, revision: str | None, patterns: list[str]) -> SourceInfo:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # no .git, .cache, …
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if not name.startswith(".") and _matches(rel, patterns):
                files.append(rel)
    files.sort()
    return SourceInfo(source, "local", revision, str(root), files, [(root / f).stat().st_size for f in files])


def _hub(repo: str, revision: str | None, patterns: list[str], download: bool) -> SourceInfo:
    from huggingface_hub import HfApi, snapshot_download

    if download:  # also works offline (HF_HUB_OFFLINE=1) once the snapshot is in the cache
        root = Path(snapshot_download(repo, repo_type="dataset", revision=revision))
        info = _local(repo, root, root.name, patterns)  # the snapshot folder is named after its commit
        info.kind = "hub"
        return info
    info = HfApi().dataset_info(repo, revision=revision, files_metadata=True)
    sha = info.sha
    siblings = sorted((s.rfilename, s.size or 0) for s in info.siblings or [] if _matches(s.rfilename, patterns))
    files, sizes = [f for f, _ in siblings], [s for _, s in siblings]
    return SourceInfo(repo, "hub", sha, f"hf://datasets/{repo}@{sha}", files, sizes)


def parquet_columns_and_rows(url: str) -> tuple[list[str], Iterator[dict]]:
    """(column names, row iterator) of one parquet file, streamed by `datasets`; images stay undecoded."""
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=[url], split="train", streaming=True).decode(False)
    columns = list(ds.features) if ds.features is not None else []
    return columns, iter(ds)


def parquet_num_rows(info: SourceInfo) -> int | None:
    """Total rows of the matched parquet files from their footers (local only; None for the Hub)."""
    if info.root.startswith("hf://"):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(info.url(f)).metadata.num_rows for f in info.files)


def json_records(path: str | os.PathLike, chunk_size: int = 1 << 20) -> Iterator[object]:
    """Records of a JSON file holding a top-level array, or of a JSON-lines file, read incrementally."""
    decoder = json.JSONDecoder()
    with open(path, "r", encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            data = f.read(chunk_size)
            eof = not data
            buf, pos = buf[pos:] + data, 0
            return bool(data)

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip(" \t\r\n\ufeff")
        in_array = pos < len(buf) and buf[pos] == "["
        if in_array:
            pos += 1
        while True:
            skip(" \t\r\n," if in_array else " \t\r\n")
            if pos >= len(buf):
                if in_array:
                    raise ValueError(f"{path}: the JSON array is not closed")
                return
            if in_array and buf[pos] == "]":
                return
            while True:
                try:
                    record, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError as err:
                    if not fill():  # the record is cut short by the end of the file, or malformed
                        raise ValueError(f"{path}: invalid JSON near character {err.pos}: {err.msg}") from None
                    continue
                if end == len(buf) and not eof and fill():
                    continue  # a number or literal may continue past the buffer: decode it again
                pos = end
                yield record
                break
