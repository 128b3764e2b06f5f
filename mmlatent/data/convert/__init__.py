"""Converters from public latent-reasoning corpora to mmlatent shards (DESIGN §2 sample format).

One file per corpus (`monet`, `zebra_cot`, `scienceqa`, `mmmu`) says how a record becomes a sample; the
shared driver in `common` streams the records, converts them in worker processes, and writes resumable,
byte-deterministic shards with a `manifest.json` and a `skips.jsonl` (one line per skipped record).
`CONVERTERS` is the registry the `mmlatent data convert NAME` command and the recipes in `datasets/` use.
"""

from __future__ import annotations

from mmlatent.data.convert.common import ConversionError, ConvertOptions, Converter, Record, make_key, run_conversion
from mmlatent.data.convert.mmmu import MMMUConfig, MMMUConverter
from mmlatent.data.convert.monet import MonetConfig, MonetConverter
from mmlatent.data.convert.scienceqa import ScienceQAConfig, ScienceQAConverter
from mmlatent.data.convert.zebra_cot import ZebraCoTConfig, ZebraCoTConverter

CONVERTERS: dict[str, type[Converter]] = {
    c.name: c for c in (MonetConverter, ZebraCoTConverter, ScienceQAConverter, MMMUConverter)
}
"""Converter classes by name."""


def convert(name: str, cfg: object, out_dir: str, options: ConvertOptions = ConvertOptions()) -> dict:
    """Run converter `name` with its config `cfg` into `out_dir`; return the manifest."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; choose from {sorted(CONVERTERS)}")
    return run_conversion(CONVERTERS[name](cfg), out_dir, options)


__all__ = [
    "CONVERTERS", "ConversionError", "ConvertOptions", "Converter", "MMMUConfig", "MonetConfig", "Record",
    "ScienceQAConfig", "ZebraCoTConfig", "convert", "make_key", "run_conversion",
]
