"""`mmlatent data convert NAME`: typed, documented options; a JSON summary line; resumable re-runs; clear
errors for bad options and unknown converters."""

from __future__ import annotations

import json

import pytest

from mmlatent.cli import main
from tests.data.test_convert_scienceqa import sqa, write_scienceqa


def test_convert_help_lists_converters_and_documents_options(capsys):
    assert main(["data", "convert", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("monet", "zebra_cot", "scienceqa", "mmmu"):
        assert f"\n  {name} " in out
    with pytest.raises(SystemExit) as exit_:
        main(["data", "convert", "zebra_cot", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--source", "--files", "--image_format", "--max_image_size", "--samples_per_shard", "--workers",
                   "--overwrite", "--limit"):
        assert option in out, option
    assert "Longest image side in pixels" in out  # field docstrings reach --help


def test_convert_command_writes_shards_and_resumes(tmp_path, capsys):
    write_scienceqa(tmp_path / "sqa" / "data" / "train-00000-of-00001.parquet",
                    [sqa(f"Question {i}?", ["yes", "no"], i % 2) for i in range(5)] + [sqa("bad", ["a"], 3)])
    args = ["data", "convert", "scienceqa", "--source", str(tmp_path / "sqa"), "--out", str(tmp_path / "out"),
            "--samples_per_shard", "2", "--workers", "0", "--progress", "false"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(tmp_path / "out"), "written": 5, "skipped": {"bad_answer": 1}, "shards": 3,
                       "records": 6, "skips": str(tmp_path / "out" / "skips.jsonl")}
    (line,) = map(json.loads, open(tmp_path / "out" / "skips.jsonl"))  # why the skipped record was skipped
    assert line["reason"] == "bad_answer" and line["row"] == 5 and line["key"] == "scienceqa-train-00000-of-00001-5"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["options"]["samples_per_shard"] == 2 and manifest["options"]["split"] == "train"
    assert main(args) == 0  # complete: nothing is rewritten
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 5
    assert main([*args[:-6], "--samples_per_shard", "3", "--workers", "0", "--progress", "false"]) == 2
    assert "--overwrite true" in capsys.readouterr().err


def test_bad_options_and_unknown_converter_fail_clearly(tmp_path, capsys):
    assert main(["data", "convert", "nope"]) == 2
    assert "unknown converter 'nope'" in capsys.readouterr().err
    assert main(["data", "convert", "mmmu", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--samples_per_shard", "0"]) == 2
    assert "samples_per_shard must be >= 1" in capsys.readouterr().err
    assert main(["data", "convert", "mmmu", "--source", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "neither an existing path nor a Hub dataset id" in capsys.readouterr().err
