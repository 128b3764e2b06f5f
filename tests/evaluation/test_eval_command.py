"""`mmlatent eval` end to end: a Lightning checkpoint on ScienceQA, re-scoring MMMU responses, bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mmlatent.evaluation.command import load_model, main
from mmlatent.evaluation.runner import EvalConfig, evaluate
from mmlatent.evaluation.tasks import load_eval_data
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
