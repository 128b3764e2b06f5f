"""The training-time evaluation callback: rank slices cover the subset once, results are logged and written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from mmlatent.evaluation.callback import EvalCallback, metric_name
from tests.evaluation.test_eval_data import write_scienceqa


class FakeModule:
    """What the callback touches on a LightningModule: `.model` and `.log`."""

    def __init__(self, model):
        self.model = model
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


@pytest.fixture
def callback(tmp_path):
    root = write_scienceqa(tmp_path / "sqa", "data")
    return EvalCallback(task="scienceqa", data=str(root), limit=3, batch_size=2, max_new_tokens=3,
                        output_dir=str(tmp_path / "evals"), cache_dir=str(tmp_path / "cache"))


def test_rank_slices_partition_the_subset_and_agree_with_one_rank(tiny_model, callback):
    one = callback.evaluate_rank(tiny_model, rank=0, world_size=1)
    r0 = callback.evaluate_rank(tiny_model, rank=0, world_size=2)
    r1 = callback.evaluate_rank(tiny_model, rank=1, world_size=2)
    assert [r["id"] for r in r0] == ["test_0", "test_2"] and [r["id"] for r in r1] == ["test_1"]
    by_id = {r["id"]: r["response"] for r in r0 + r1}
    assert by_id == {r["id"]: r["response"] for r in one}


def test_validation_epoch_end_logs_and_writes(tiny_model, callback, tmp_path):
    module = FakeModule(tiny_model)
    trainer = SimpleNamespace(sanity_checking=True, current_epoch=0, global_rank=0, world_size=1)
    callback.on_validation_epoch_end(trainer, module)
    assert module.logged == {}  # nothing during the sanity check

    trainer.sanity_checking = False
    callback.on_validation_epoch_end(trainer, module)
    assert {"eval/scienceqa/acc", "eval/scienceqa/unparsed", "eval/scienceqa/NAT", "eval/scienceqa/G1-6"} <= set(module.logged)
    assert module.logged["eval/scienceqa/acc"] == callback.last_results["acc"]
    results = json.loads((tmp_path / "evals" / "epoch=0" / "results.json").read_text())
    assert results["num"] == 3 and results["epoch"] == 0
    assert metric_name("mmmu", "Art & Design") == "eval/mmmu/Art_Design"


@pytest.mark.slow
def test_callback_in_a_real_fit(tmp_path, monkeypatch):
    """The shipped callback config, added to the tiny stage-1 config, evaluates after validation and logs."""
    import csv

    from mmlatent.cli import main
    from mmlatent.data.synthetic import SynthConfig, synthesize
    from tests.conftest import REPO

    synthesize(tmp_path / "synth", SynthConfig(), train=16, val=8, seed=4, samples_per_shard=8, progress=False)
    root = write_scienceqa(tmp_path / "sqa", "data")
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "-c", str(REPO / "train" / "configs" / "tiny" / "stage1.yaml"),
        "--data.train.shards=synth/train", "--data.val.shards=synth/val", "--data.batch_size=8",
        "--data.num_workers=0", "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks+={REPO / 'eval' / 'callbacks' / 'scienceqa_img.yaml'}",  # the shipped config
        f"--trainer.callbacks.data={root}", "--trainer.callbacks.limit=2",
        "--trainer.callbacks.max_new_tokens=3", "--trainer.callbacks.output_dir=evals",
        f"--trainer.callbacks.cache_dir={tmp_path / 'cache'}",
    ])
    rows = list(csv.DictReader(open(tmp_path / "runs/tiny/stage1/logs/version_0/metrics.csv")))
    assert any(r.get("eval/scienceqa/acc") not in (None, "") for r in rows)
    results = json.loads((tmp_path / "evals" / "epoch=0" / "results.json").read_text())
    assert (results["num"], results["subset"]) == (2, "img")


def _rank_main(rank: int, world_size: int, port: int, root: str, cache: str, out: str) -> None:
    """One rank of a gloo group: its slice, the gather, the results written per rank for the parent."""
    import os

    import torch
    import torch.distributed as dist

    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = LatentVLM(preset("tiny")).eval()
        cb = EvalCallback(task="scienceqa", data=root, limit=3, batch_size=2, max_new_tokens=3, cache_dir=cache)
        module = FakeModule(model)
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, global_rank=rank, world_size=world_size)
        cb.on_validation_epoch_end(trainer, module)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"results": cb.last_results, "slice": [r["id"] for r in cb.evaluate_rank(model, rank, world_size)]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_gather_the_same_results_as_one(tmp_path):
    import socket

    import torch
    import torch.multiprocessing as mp

    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    root, cache = str(write_scienceqa(tmp_path / "sqa", "data")), str(tmp_path / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks inherit the imported modules instead of importing torch, lightning and transformers again
    mp.start_processes(_rank_main, args=(2, port, root, cache, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["slice"] == ["test_0", "test_2"] and ranks[1]["slice"] == ["test_1"]
    assert ranks[0]["results"] == ranks[1]["results"]  # every rank holds everything after the gather

    torch.manual_seed(0)
    single = EvalCallback(task="scienceqa", data=root, limit=3, batch_size=2, max_new_tokens=3, cache_dir=cache)
    single.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, current_epoch=0, global_rank=0, world_size=1),
                                   FakeModule(LatentVLM(preset("tiny")).eval()))
    assert ranks[0]["results"] == json.loads(json.dumps(single.last_results))
