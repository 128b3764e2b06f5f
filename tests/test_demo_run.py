"""The demo's longer command (`--seeds 2 --ablation regions`) end to end at a tiny size: every run of every seed
and variant trains, both splits are scored, and results.json holds what README's tables are drawn from."""

from __future__ import annotations

import json

import pytest

from mmlatent.demo import STAGES, DemoConfig, main
from mmlatent.demo_eval import checkpoint


@pytest.mark.demo_seeds  # about 6 minutes: `make test-scale`, not `make test`
def test_two_seeds_with_and_without_regions_write_every_table(tmp_path, capsys):
    demo = DemoConfig(steps={"stage1": 2, "stage2": 1, "stage3": 1}, batch_size=4, val=4, test=6, longer=4, val_every=1)
    out = tmp_path / "demo"
    main(["--out", str(out), "--seeds", "2", "--ablation", "regions"], demo=demo)
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["seeds"]) == ["1", "2"] and results["config"]["variants"] == ["regions", "no_regions"]
    for seed in ("1", "2"):
        for variant in ("regions", "no_regions"):
            r = results["seeds"][seed][variant]
            assert r["steps"] == {"stage1": 2, "stage2": 1, "stage3": 1, "direct": 4, "cot": 4}
            for mode in ("direct", "cot", "latent"):
                assert r[mode]["test"]["questions"] == 6 and r[mode]["longer"]["questions"] == 4
                assert set(r[mode]["test"]["per_hop"]) <= {"1", "2"} and set(r[mode]["longer"]["per_hop"]) <= {"3", "4"}
            for split in ("test", "longer"):
                assert set(r["reference"][split]) == {"majority_colour", "chance"}
                assert r["reference"][split]["chance"]["accuracy"] == pytest.approx(0.25)
            assert set(r["latent"]["interventions"]) == {"zero", "noise", "swap"}
            assert set(r["cot"]["interventions"]) == {"first", "last"}
            assert {"selection_on_path", "selection_on_own_cell"} <= set(r["latent"]["selection"])
            assert set(r["latent"]["slots"]) == {"test", "longer"}
    # the two seeds drew different data
    assert (out / "seed1" / "data" / "test").is_dir() and (out / "seed2" / "data" / "longer").is_dir()
    rows = results["summary"]["regions"]["rows"]
    assert {"direct", "cot", "latent", "majority_colour", "chance"} <= set(rows)
    assert set(rows["latent"]["test"]["accuracy"]) == {"mean", "min", "max"}
    assert (out / "curves.png").is_file() and (out / "export").is_dir()
    printed = capsys.readouterr().out
    assert "mean [min, max] over seeds [1, 2], no regions" in printed and "majority_colour" in printed
    # a re-run retrains nothing and re-reads each variant's scores
    mtime = checkpoint(out / "seed1" / "regions", "stage3").stat().st_mtime_ns
    main(["--out", str(out), "--seeds", "2", "--ablation", "regions"], demo=demo)
    assert checkpoint(out / "seed1" / "regions", "stage3").stat().st_mtime_ns == mtime
    assert "evaluation skipped" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]
    assert all(checkpoint(out / "seed2" / "no_regions", name).exists() for name in STAGES)
