"""The demo's per-run configs: what each of the five runs trains on, for how long, and from what."""

from __future__ import annotations

import yaml

from mmlatent.demo import BASELINES, STAGES, DemoConfig, checkpoint, stage_config


def test_each_run_gets_its_steps_data_and_predecessor(tmp_path):
    demo = DemoConfig()
    cfgs = {name: yaml.safe_load(stage_config(name, tmp_path / "out", tmp_path / "data", demo).read_text())
            for name in STAGES}
    total = sum(demo.steps.values())
    for name, cfg in cfgs.items():
        assert cfg["trainer"]["max_steps"] == (total if name in BASELINES else demo.steps[name]), name
        assert cfg["data"]["train"]["shards"] == str(tmp_path / "data" / "train")
        assert cfg["trainer"]["default_root_dir"] == str(tmp_path / "out" / name)
    # no run repeats a training sample: the baselines, the longest runs, see `train` samples once
    assert demo.train == total * demo.batch_size
    # stage 2 starts from and aligns to stage 1; stage 3 starts from stage 2 and aligns to nothing
    assert cfgs["stage2"]["model"]["init_from"] == str(checkpoint(tmp_path / "out", "stage1"))
    assert cfgs["stage2"]["model"]["stage"]["teacher"]["checkpoint"] == str(checkpoint(tmp_path / "out", "stage1"))
    assert cfgs["stage3"]["model"]["init_from"] == str(checkpoint(tmp_path / "out", "stage2"))
    assert "teacher" not in cfgs["stage3"]["model"]["stage"] and cfgs["stage3"]["model"]["stage"]["align_weight"] == 0
    # the CoT baseline is stage 1's recipe with every aux image dropped, from scratch
    cot = cfgs["cot"]["model"]
    assert cot["stage"]["name"] == "stage1" and cot["stage"]["aux_dropout"] == 1.0 and "init_from" not in cot
    assert cfgs["stage1"]["model"]["stage"]["aux_dropout"] == 0.0


def test_without_regions_every_run_loses_its_grounding_weights(tmp_path):
    """`regions=False` (the `--ablation regions` runs) turns off the one place each mode learns from the region
    labels: the selection loss of stages 1-3 and the attention loss of the baselines; nothing else changes."""
    demo = DemoConfig()
    for name in STAGES:
        with_regions = yaml.safe_load(stage_config(name, tmp_path / "a", tmp_path / "data", demo).read_text())
        without = yaml.safe_load(stage_config(name, tmp_path / "b", tmp_path / "data", demo, regions=False).read_text())
        grounding = with_regions["model"]["stage"]["grounding"]
        weight = "attention_weight" if name in BASELINES else "selection_weight"
        assert grounding[weight] > 0, name
        assert without["model"]["stage"]["grounding"] == {**grounding, weight: 0.0}, name
        assert without["data"] == with_regions["data"] and without["model"]["optim"] == with_regions["model"]["optim"]


def test_a_run_stopped_part_way_resumes_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    """A killed run leaves a partial last.ckpt (written every 100 steps): a re-run resumes it, never scores it."""
    import torch

    import mmlatent.cli
    from mmlatent.demo import train

    demo = DemoConfig()
    calls = []
    monkeypatch.setattr(mmlatent.cli, "main", lambda argv: calls.append(argv) or 0)
    ckpt = checkpoint(tmp_path, "stage3")
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": demo.steps["stage3"] - 100}, ckpt)
    train("stage3", tmp_path, tmp_path / "data", demo, True, "[test]")
    assert calls[-1][-2:] == ["--ckpt_path", str(ckpt)]
    torch.save({"global_step": demo.steps["stage3"]}, ckpt)
    assert train("stage3", tmp_path, tmp_path / "data", demo, True, "[test]") == 0.0 and len(calls) == 1
