"""`mmlatent data synth` writes train/val shards and a manifest, deterministically."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from tests.conftest import REPO


def synth(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "mmlatent", "data", "synth", "--out", str(out), "--train", "40", "--val", "10",
         "--samples_per_shard", "16", *extra],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.tar"))}


def test_synth_command_writes_manifest_and_same_bytes(tmp_path):
    r = synth(tmp_path / "a", "--seed", "3", "--generator.grid_size", "4", "--generator.hops", "[2, 3]")
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["seed"] == 3
    assert manifest["splits"]["train"]["written"] == 40 and manifest["splits"]["val"]["written"] == 10
    assert len(list((tmp_path / "a" / "train").glob("*.tar"))) == 3
    assert manifest["generator"]["hops"] == [2, 3]
    assert synth(tmp_path / "b", "--seed", "3").returncode == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert synth(tmp_path / "c", "--seed", "4").returncode == 0
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_bad_generator_option_names_the_field(tmp_path):
    r = synth(tmp_path, "--generator.num_choices", "40")
    assert r.returncode != 0 and "num_choices" in r.stderr
