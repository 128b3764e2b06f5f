"""Find a benchmark split's parquet files (a local folder or a Hub dataset) and read them with `datasets`.

A Hub id is first mirrored with `huggingface_hub.snapshot_download`, fetching only the split's parquet
files, so a Hub id and a local copy of the repository go through the same code: find the files named
`{split}-*.parquet` or `{split}.parquet` anywhere under the root, grouped by folder. That covers the layouts
in use: one folder per subject (MMMU/MMMU: `Accounting/validation-00000-of-00001.parquet`), a single
`data/` folder (lmms-lab/MMMU, derek-thomas/ScienceQA), one folder per config (lmms-lab/ScienceQA). The
task picks which groups to read. The files are then loaded with `datasets.load_dataset("parquet")`, which
keeps them memory-mapped; the trade-off is an Arrow copy in the datasets cache on first read.

Images are read undecoded (`{"bytes", "path"}` structs) and decoded per question with PIL, whether the
parquet carries the HF `Image` feature or a bare struct; presence is read from the Arrow validity bits, so
finding which rows have images never copies image bytes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from mmlatent.data.image_decode import decode_rgb, to_rgb

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def split_files(root: str | Path, split: str) -> dict[str, list[Path]]:
    """The split's parquet files under `root`, grouped by their folder relative to `root` (sorted)."""
    root = Path(root)
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # .cache and other hidden folders
        if path.name == f"{split}.parquet" or path.name.startswith(f"{split}-"):
            groups[path.parent.relative_to(root).as_posix()].append(path)
    return dict(groups)


def resolve_root(data: str, split: str, revision: str | None = None) -> Path:
    """A local folder as is; a Hub dataset id mirrored (only the split's parquet files) to the HF cache."""
    path = Path(data).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--data {data!r} is a file; give the dataset folder (laid out like the Hub repository)")
        return path
    if not _HUB_ID.match(data):
        raise ValueError(f"--data {data!r} is neither an existing folder nor a Hub dataset id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = [f"{split}-*.parquet", f"{split}.parquet", f"*/{split}-*.parquet", f"*/{split}.parquet"]
    try:
        return Path(snapshot_download(data, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as err:
        raise ValueError(f"--data {data!r}: could not fetch the dataset from the Hub ({type(err).__name__}: {err})") from err


def read_parquet(files: list[Path], image_columns: tuple[str, ...], cache_dir: str | None = None):
    """A `datasets.Dataset` over `files`, with every present image column cast to undecoded `Image`."""
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in files], split="train", cache_dir=cache_dir
    )
    for column in image_columns:
        if column in ds.column_names and isinstance(ds.features[column], datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def image_presence(ds, column: str) -> list[bool]:
    """Per row: does `column` hold an image (non-null, with bytes or a path)? All False if no such column."""
    if column not in ds.column_names:
        return [False] * len(ds)
    col = ds.data.column(column)  # pa.ChunkedArray, memory-mapped
    if pa.types.is_null(col.type):
        return [False] * len(ds)
    valid = pc.is_valid(col)
    if pa.types.is_struct(col.type):
        names = {col.type.field(i).name for i in range(col.type.num_fields)}
        parts = [pc.is_valid(pc.struct_field(col, name)) for name in ("bytes", "path") if name in names]
        if parts:
            has = parts[0] if len(parts) == 1 else pc.or_(parts[0], parts[1])
            valid = pc.and_(valid, has)
    return [bool(v) for v in valid.to_pylist()]


def open_image(value: Any, root: Path | None = None) -> Image.Image | None:
    """An HF image value (struct with bytes or path, a PIL image, or None) as an RGB PIL image, decoded as the
    shard reader decodes training images (`mmlatent.data.image_decode`)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_rgb(value["bytes"])
        if value.get("path"):
            path = Path(value["path"])
            if not path.is_absolute() and root is not None and (root / path).exists():
                path = root / path
            return decode_rgb(path.read_bytes())
        return None
    raise TypeError(f"cannot read an image from a {type(value).__name__}")
