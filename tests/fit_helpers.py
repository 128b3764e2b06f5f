"""What the distributed and reliability tests share: `mmlatent fit` runs in a subprocess on a tiny stage-1
config, and the Lightning callbacks they load into those runs by class path (record which samples each
rank trained on, crash or die at a given step, inject a NaN loss)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE1 = REPO / "train" / "configs" / "tiny" / "stage1.yaml"


def fit_config(folder: Path, callbacks: list[dict], **trainer) -> Path:
    """A config on top of the tiny stage 1: checkpoints every 2 steps into `folder/ckpt`, CSV logs in
    `folder/logs`, no validation, deterministic; `callbacks` added after the checkpoint callback."""
    cfg = {
        "trainer": {
            "default_root_dir": str(folder),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(folder), "name": "logs"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(folder / "ckpt"), "every_n_train_steps": 2, "save_last": True,
                                "monitor": None, "filename": "{epoch}-{step}"}},  # no validation to monitor
                *callbacks,
            ],
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0, "deterministic": True, **trainer,
        },
    }
    path = folder / "test.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_fit(folder: Path, data: Path, *args: str, callbacks: list[dict] = (), timeout: int = 240,
            launcher: list[str] | None = None, env: dict[str, str] | None = None, **trainer) -> subprocess.CompletedProcess:
    """`python -m mmlatent fit` (or `launcher`, a command that ends up running it) on the tiny stage 1 over
    `data/{train,val}` with the test config, one torch thread per process (results do not depend on how
    many cores the machine has)."""
    launcher = launcher or [sys.executable, "-m", "mmlatent", "fit"]
    cmd = [*launcher, "-c", str(STAGE1), "-c", str(fit_config(folder, list(callbacks), **trainer)),
           f"--data.train.shards={data / 'train'}", f"--data.val.shards={data / 'val'}", "--data.batch_size=4",
           "--data.shuffle_buffer=6", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONFAULTHANDLER": "1", **(env or {})}
    # its own process group: on a timeout every process of the run (ranks, data workers) prints where it
    # stands (faulthandler on SIGABRT), so a hang fails with its stacks instead of a bare timeout
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:4])} ... did not end within {timeout} s; the stacks of its processes:\n"
                             f"{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def recorded_steps(folder: Path, rank: int = 0) -> list[dict]:
    """The `KeyRecorder` lines of one rank; a step recorded twice (before a crash and after the resume)
    keeps its last record."""
    lines = [json.loads(x) for x in (folder / "keys" / f"keys.rank{rank}.jsonl").read_text().splitlines()]
    by_step = {line["step"]: line for line in lines}
    return [by_step[s] for s in sorted(by_step)]


def logged(folder: Path, name: str, last_version: bool = False) -> dict[int, float]:
    """step -> value of one logged metric over every CSV log version of a run (later versions win), or
    over the last version only."""
    out: dict[int, float] = {}
    versions = sorted((folder / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for metrics in versions[-1:] if last_version else versions:
        for row in csv.DictReader(open(metrics)):
            if row.get(name):
                out[int(row["step"])] = float(row[name])
    return out


def final_state(folder: Path) -> dict:
    """The last checkpoint's model weights and optimiser state (weights-only load)."""
    ckpt = torch.load(folder / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    return {"state_dict": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"][0]["state"],
            "global_step": ckpt["global_step"]}


class KeyRecorder(L.Callback):
    """Writes `{out}/keys.rank{R}.jsonl`: one line per training step (epoch, batch, keys, filler), appended as
    the steps run, so a run that dies keeps what it recorded."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        line = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step, "keys": batch.keys,
                "filler": batch.filler}
        with open(self.out / f"keys.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


class FailAt(L.Callback):
    """Ends the run at the start of global step `step`: `kill` sends SIGKILL to this very process (no
    cleanup at all), `raise` raises on every rank (a crash a multi-process run can shut down from)."""

    def __init__(self, step: int, how: str = "kill"):
        self.step, self.how = step, how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected crash at step {self.step}")


class NanAt(L.Callback):
    """Makes the loss of global step `step` NaN (every term times NaN, so its gradient is NaN too) and writes
    the weights' sum before and after that step to `{out}/nan_step.json`."""

    def __init__(self, step: int, out: str):
        self.step, self.out = step, Path(out)
        self.before: float | None = None

    @staticmethod
    def weights_sum(pl_module) -> float:
        return float(sum(p.detach().double().sum() for p in pl_module.model.parameters()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step:
            return
        self.before = self.weights_sum(pl_module)
        stage = pl_module.stage
        original = stage.losses

        def poisoned(model, b, out):
            stage.losses = original  # once
            return {k: v * torch.tensor(float("nan")) for k, v in original(model, b, out).items()}

        stage.losses = poisoned

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.before is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "nan_step.json").write_text(json.dumps(
                {"before": self.before, "after": self.weights_sum(pl_module), "keys": batch.keys}))
            self.before = None
