"""`mmlatent eval` end to end: a Lightning checkpoint on ScienceQA, re-scoring MMMU responses, bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mmlatent.evaluation.command import load_model, main
from mmlatent.evaluation.runner import EvalConfig, evaluate
from mmlatent.evaluation.tasks import TASKS, load_eval_data
from tests.evaluation.test_eval_data import write_mmmu, write_scienceqa


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_a_checkpoint_matches_the_in_memory_model(tmp_path, capsys):
    from mmlatent.training.module import LatentVLMModule

    torch.manual_seed(0)
    module = LatentVLMModule()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.equal(load_model(str(ckpt)).backbone.lm_head(torch.ones(1, 128)), module.model.backbone.lm_head(torch.ones(1, 128)))

    root, cache = write_scienceqa(tmp_path / "sqa", "configs"), str(tmp_path / "cache")
    main(["--task", "scienceqa", "--data", str(root), "--subset", "img", "--model", str(ckpt), "--output", str(tmp_path / "out"),
          "--batch-size", "2", "--max-new-tokens", "4", "--cache-dir", cache, "--no-progress", "--device", "cpu"])
    summary = last_json(capsys)
    assert summary["task"] == "scienceqa" and summary["subset"] == "img" and summary["num"] == 2
    assert {"results.json", "results.png", "samples.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert not (tmp_path / "out" / "submission.json").exists()  # MMMU only
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["breakdown"]["groups"]) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert results["eval"]["latent"] is True

    data = load_eval_data("scienceqa", str(root), "test", subset="img", cache_dir=cache)
    direct = evaluate(module.model, data, EvalConfig(batch_size=1, max_new_tokens=4, progress=False), tmp_path / "direct")
    lines = lambda p: [json.loads(x)["response"] for x in (p / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "out") == lines(tmp_path / "direct")
    assert direct["num"] == 2


def test_rescore_command(tmp_path, capsys):
    root = write_mmmu(tmp_path / "mmmu", "data")
    responses = tmp_path / "r.jsonl"
    responses.write_text(
        json.dumps({"id": "validation_Accounting_1", "response": "(A) cat"}) + "\n"
        + json.dumps({"id": "validation_Clinical_Medicine_1", "response": "The dose is 2.5 mg."}) + "\n"
    )
    main(["--task", "mmmu", "--data", str(root), "--split", "validation", "--responses", str(responses),
          "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    summary = last_json(capsys)
    assert summary == {"task": "mmmu", "split": "validation", "subset": "full", "protocol": "mmmu", "num": 2, "correct": 1,
                       "acc": 0.5, "acc_ci95": pytest.approx([0.0945, 0.9055], abs=1e-4), "acc_if_guessed": 0.5,
                       "unparsed": 0, "missing": 2}
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert submission == {"validation_Accounting_1": "A", "validation_Clinical_Medicine_1": "The dose is 2.5 mg."}


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--task", "mmmu", "--model", "a.ckpt", "--responses", "r.jsonl", "--output", "o"])
    assert err.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--task", "scienceqa", "--data", str(tmp_path), "--responses", "r.jsonl", "--output", str(tmp_path / "o")])
    assert err.value.code == 2 and "no parquet files for split 'test'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_model):
    """The session's tiny model as an exported folder (`--model DIR` loads it like a Hub id)."""
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("export") / "tiny")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_exits_0_and_draws_every_breakdown(task, tmp_path, export_dir, synth_dir, capsys):
    """`mmlatent eval --task T` for every task: exit 0, all output files, and a chart panel per breakdown
    (synthetic's `tasks` and `hops`, shards' `sources`, MMMU's disciplines and subjects, ScienceQA's groups)."""
    from mmlatent.evaluation.chart import panels

    data = {
        "mmmu": lambda: write_mmmu(tmp_path / "mmmu", "data", ("validation",)),
        "scienceqa": lambda: write_scienceqa(tmp_path / "sqa", "data"),
        "shards": lambda: synth_dir / "val",
        "synthetic": lambda: synth_dir / "val",
    }[task]()
    out = tmp_path / "out"
    main(["--task", task, "--data", str(data), "--model", str(export_dir), "--output", str(out), "--limit", "3",
          "--batch-size", "2", "--max-new-tokens", "3", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
          "--device", "cpu"])
    assert last_json(capsys)["num"] == 3
    assert {"results.json", "results.png", "samples.jsonl"} <= {p.name for p in out.iterdir()}
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    drawn = {label for _, groups in panels(results) for label in groups}
    for name, groups in results["breakdown"].items():
        want = {"Overall"} if name == "overall" else set(groups)
        assert want <= drawn, name


def test_test_time_scaling_flags_vote_and_record_the_votes(tmp_path, export_dir, synth_dir, capsys):
    """`--trajectories M --latent-noise K` reach the vote: each line of samples.jsonl holds how the M
    trajectories voted (parsed letters; an unparsable answer is not counted); without noise, or with MC
    dropout on a sketch-mode model, the command stops with one line saying why."""
    out = tmp_path / "out"
    common = ["--task", "synthetic", "--data", str(synth_dir / "val"), "--model", str(export_dir), "--limit", "2",
              "--max-new-tokens", "3", "--no-progress", "--device", "cpu"]
    main([*common, "--output", str(out), "--trajectories", "3", "--latent-noise", "gaussian", "--noise-std", "0.5"])
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(sum(r["votes"].values()) <= 3 for r in lines)
    assert all(set(r["votes"]) <= set("ABCD") for r in lines)
    assert all(r["prediction"] == max(r["votes"], key=r["votes"].get) for r in lines if r["votes"])
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["trajectories"] == 3 and results["eval"]["latent_noise"] == "gaussian"
    for extra, why in ((["--trajectories", "2"], "needs a --latent-noise"),
                       (["--trajectories", "2", "--latent-noise", "mc_dropout"], "thought mode only")):
        with pytest.raises(SystemExit) as err:
            main([*common, "--output", str(tmp_path / "o2"), *extra])
        assert err.value.code == 2 and why in capsys.readouterr().err
