"""The real path at full size on a CPU: each flagship model built from its released configuration with random
weights (no download), stages 1, 2 and 3 of its recipe for a few steps, then save -> resume -> export -> reload
-> generate, with the memory model's prediction beside every measured peak.

Flagships (`FLAGSHIPS`): Qwen2.5-VL-3B native (its recipes), SigLIP ViT-B/16 + Qwen2.5-0.5B composed (its
recipes), LLaVA-1.5-7B (the Qwen2.5-VL recipes with `backbone: llava`). Each runs `mmlatent fit` on its recipe
files as a user would, changed only where a 2-core CPU demands: one CPU device, bf16 weights, bf16-mixed,
batch 1, two steps per stage, LoRA on the 3B and 7B LMs (the recipes' activation checkpointing stays), and
the teacher precomputed with `mmlatent teacher` where an online copy would not fit beside the student
(SigLIP's stage 2 runs its teacher online). Samples are Monet-layout shards (`mmlatent.data.layout_samples`):
one question image and one aux image up to 1024 px, short text. `--text-layers`/`--vision-layers` shrink the
models (fewer layers, real widths; a composed model's open_clip tower keeps its size) to check the script and
the memory model at smaller points.

Every stage runs in its own process; its peak resident memory (VmHWM, polled) is compared with
`mmlatent.training.memory_plan`'s prediction for the same settings on a CPU (`kind: cpu`: the host is the
device, including the model-plus-checkpoint moment at the start of a stage). A model whose prediction does
not fit the memory available now (plus `--headroom-gib`) is skipped, saying so. Per model it reports the
peak memory, seconds and tokens per step, the parameter, gradient, optimiser and activation bytes
(`rehearsal_probe.StepProbe`), the prediction and its error, and `ok` for save -> resume -> export -> reload
-> generate (an answer that runs a latent block). The last line printed is one JSON object. Run by hand:
`nice -n 10 python benchmarks/rehearsal.py` (the full sizes take tens of minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


@dataclass
class Flagship:
    """One flagship model: its architecture, the recipes it runs, and what changes on this machine."""

    arch: str
    """Hub id in `mmlatent.model.architectures.ARCHITECTURES`."""
    recipes: str
    """Folder of its stage1/2/3.yaml under train/configs."""
    model: list[str]
    """Overrides pointing the recipe at the random folder (`{folder}` is replaced)."""
    online_teacher_stages: tuple[str, ...] = ()
    """Stages whose teacher runs online (the rest read a cache `mmlatent teacher` writes first)."""


NATIVE = ["--model.vlm.native.name_or_path={folder}", "--model.vlm.tokenizer.name_or_path={folder}",
          "--model.vlm.native.dtype=bfloat16", "--model.vlm.lora.enabled=true", "--model.optim.lr=2e-4"]
FLAGSHIPS = {
    "qwen2.5-vl-3b": Flagship("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl_3b", NATIVE),
    "siglip-qwen2.5-0.5b": Flagship(
        "Qwen/Qwen2.5-0.5B-Instruct", "siglip_qwen2_5_0_5b",
        ["--model.vlm.lm.name_or_path={folder}", "--model.vlm.tokenizer.name_or_path={folder}",
         "--model.vlm.vision.pretrained=null"],
        online_teacher_stages=("stage2",)),
    "llava-1.5-7b": Flagship("llava-hf/llava-1.5-7b-hf", "qwen2_5_vl_3b",
                             [*NATIVE, "--model.vlm.backbone=llava", "--model.vlm.native.image_size=null"]),
}
MACHINE = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=bf16-mixed",
           "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.accumulate_grad_batches=1",
           "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.max_epochs=1",
           "--data.num_workers=0", "--data.batch_size=1", "--data.shuffle_buffer=0",
           "--data.train.shards=data/layout/train", "--data.val.shards=data/layout/val"]
STEPS = 1
"""Optimiser steps per stage (the resume adds one more to stage 3)."""


@dataclass
class Run:
    """One subprocess: its peak resident memory and wall time."""

    name: str
    peak_bytes: int
    seconds: float
    returncode: int
    log: str
    extra: dict = field(default_factory=dict)


def high_water(pid: int) -> int:
    """VmHWM of a process: the peak resident memory of its program (reset at exec, unlike `ru_maxrss`, which a
    child inherits from the parent it was forked from)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(name: str, cmd: list[str], cwd: Path, log_dir: Path) -> Run:
    """Run `cmd` (a `python -m mmlatent ...` or this script), polling its peak resident memory (VmHWM)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    peak = 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, high_water(proc.pid))
            time.sleep(0.2)
    return Run(name, peak, round(time.perf_counter() - t0, 1), proc.returncode, str(log))


def mmlatent(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmlatent", *args]


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def baseline_bytes(work: Path) -> int:
    """Peak RSS of a process that loads what `mmlatent fit` loads and builds nothing (the memory model's runtime)."""
    code = ("import mmlatent.cli, mmlatent.training.module, mmlatent.training.datamodule, open_clip, timm; "
            "from mmlatent.training.memory_plan import Device, runtime_bytes; print(int(runtime_bytes(Device(0, 1, 'cpu'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return int(out.stdout.strip().splitlines()[-1])


def stage_args(flag: Flagship, stage: str, folder: str, probe: Path, layers: dict[str, int | None]) -> tuple[list[str], list[str]]:
    """(recipe files, overrides) of one stage on this machine."""
    recipe = str(REPO / "train" / "configs" / flag.recipes / f"{stage}.yaml")
    over = [*MACHINE, *(o.format(folder=folder) for o in flag.model), f"--trainer.max_steps={STEPS}"]
    runs = f"runs/{flag.recipes}"
    if stage in ("stage2", "stage3"):
        previous = f"{runs}/stage{int(stage[-1]) - 1}/checkpoints/last.ckpt"
        if stage in flag.online_teacher_stages:
            over += [f"--model.stage.teacher.checkpoint={previous}", "--model.stage.teacher.cache=null"]
        else:
            over += ["--model.stage.teacher.checkpoint=null", f"--model.stage.teacher.cache={runs}/{stage}/teacher"]
    over.append("--trainer.callbacks+=" + json.dumps(
        {"class_path": "rehearsal_probe.StepProbe", "init_args": {"out": str(probe)}}))
    return [recipe], over


def release_heap() -> None:
    """Hand the memory this process freed (the random model it wrote, the plan's probes) back to the system:
    glibc keeps freed heap pages, which the next stage's process would otherwise find taken (a 7B stage 2
    was killed for memory beside a 3.5 GB idle parent)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def predict(configs: list[str], overrides: list[str], cwd: Path, tokens: int, runtime: int) -> dict:
    """The memory model's plan for one stage on this CPU at the measured sequence length."""
    from mmlatent.training.memory_plan import Device, activation_probe, count_parameters, plan_memory, read_recipe, settings_of

    here = os.getcwd()
    os.chdir(cwd)  # the recipe's relative paths (model folder, checkpoints)
    try:
        s = settings_of(read_recipe(configs, [o for o in overrides if not o.startswith("--trainer.callbacks")]))
        counts = count_parameters(s.vlm)
        act = activation_probe(s.vlm, s.compute_dtype)
    finally:
        os.chdir(here)
    release_heap()
    plan = plan_memory(s, counts, act, Device(memory_gib=available_bytes() / GiB, count=1, kind="cpu"), seq_len=tokens,
                       batch_size=1, runtime=float(runtime))
    return {"total": plan.total, "row": plan.row(), "parameters": counts.total}


def generate_check(export: str) -> None:
    """(`--generate`) Load an exported folder and answer one question through a latent block; exit 1 if none ran."""
    import torch
    from PIL import Image

    from mmlatent.model.generation import GenerationConfig, generate_from_prompts
    from mmlatent.model.latent_vlm import LatentVLM

    model = LatentVLM.from_pretrained(export)
    ids, pixels = model.prompt(Image.new("RGB", (640, 480), "red"), "Which side is the red object on?")
    ids = torch.cat([ids, torch.tensor([model.ids.latent_start])])  # the answer opens a latent block
    [answer] = generate_from_prompts(model, [ids], pixels, GenerationConfig(max_new_tokens=model.cfg.latent.slots + 4))
    print(json.dumps({"latent_steps": answer.latent_steps, "positions": answer.positions}))
    sys.exit(0 if answer.latent_steps >= 1 else 1)


def rehearse(name: str, flag: Flagship, work: Path, layers: dict, headroom: float, runtime: int, keep: bool = False) -> dict:
    from mmlatent.data.layout_samples import LayoutConfig, write_layout_shards
    from mmlatent.model.architectures import write_random_model
    from mmlatent.cache import synthetic_tokenizer_dir

    tag = name + (f"-t{layers['text']}" if layers["text"] else "") + (f"-v{layers['vision']}" if layers["vision"] else "")
    cwd = work / tag
    logs = cwd / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    folder = f"models/{flag.arch.split('/')[-1]}"
    if not (cwd / folder / "config.json").is_file():
        write_random_model(flag.arch, cwd / folder, synthetic_tokenizer_dir(512), text_layers=layers["text"],
                           vision_layers=layers["vision"], dtype="bfloat16", full_tokenizer=True)
        release_heap()
    layout = LayoutConfig(question_images=[(1024, 768)], aux_images=[(768, 768)], question_words=16, step_words=16)
    for split, n, seed in (("train", STEPS + 1, 0), ("val", 1, 99)):
        if not (cwd / "data" / "layout" / split).is_dir():
            write_layout_shards(cwd / "data" / "layout" / split, n, layout, seed=seed, name=f"layout-{split}")
    result: dict = {"model": name, "layers": layers, "stages": {}, "checks": {}}
    first = stage_args(flag, "stage1", folder, logs / "probe-stage1.jsonl", layers)
    need = predict(*first, cwd, tokens=768, runtime=runtime)["total"]  # a first estimate before anything runs
    if need + headroom * GiB > available_bytes():
        result["skipped"] = (f"predicted {need / GiB:.1f} GiB + {headroom:g} GiB headroom > "
                             f"{available_bytes() / GiB:.1f} GiB available now")
        return result
    for stage in ("stage1", "stage2", "stage3"):
        probe = logs / f"probe-{stage}.jsonl"
        probe.unlink(missing_ok=True)
        configs, over = stage_args(flag, stage, folder, probe, layers)
        if stage != "stage1" and stage not in flag.online_teacher_stages:
            previous = f"runs/{flag.recipes}/stage{int(stage[-1]) - 1}/checkpoints/last.ckpt"
            teacher = run(f"teacher-{stage}", mmlatent("teacher", "--stage", stage, "--checkpoint", previous, "--shards",
                                                       "data/layout/train", "data/layout/val", "--out",
                                                       f"runs/{flag.recipes}/{stage}/teacher", "--batch-size", "1",
                                                       "--workers", "0", "--dtype", "bfloat16", "--max-length", "4096"), cwd, logs)
            result["stages"][f"teacher-{stage}"] = {"peak_gib": round(teacher.peak_bytes / GiB, 2), "seconds": teacher.seconds,
                                                    "ok": teacher.returncode == 0}
            if teacher.returncode:
                result["failed"] = f"teacher {stage}: see {teacher.log}"
                return result
        done = run(stage, mmlatent("fit", *sum((["-c", c] for c in configs), []), *over), cwd, logs)
        steps = [json.loads(x) for x in probe.read_text().splitlines()] if probe.is_file() else []
        if done.returncode or not steps:
            result["failed"] = f"{stage}: exit {done.returncode}, see {done.log}"
            return result
        tokens = max(s["tokens"] for s in steps)
        pred = predict(configs, over, cwd, tokens=tokens, runtime=runtime)
        result["stages"][stage] = {
            "peak_gib": round(max(done.peak_bytes, *(s["peak_rss_bytes"] for s in steps)) / GiB, 2), "predicted_gib": round(pred["total"] / GiB, 2),
            "error": round(pred["total"] / done.peak_bytes - 1, 3), "seconds_per_step": round(sum(s["seconds"] for s in steps) / len(steps), 1),
            "tokens_per_step": tokens, "process_seconds": done.seconds,
            "bytes": {k: steps[-1][k] for k in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_bytes")},
            "plan_gib": pred["row"],
        }
        result["parameters"] = pred["parameters"]
        if stage == "stage2" and not keep:  # stage 1's checkpoint is read no more (stage 3 starts from stage 2's)
            shutil.rmtree(cwd / "runs" / flag.recipes / "stage1", ignore_errors=True)
    stage3 = stage_args(flag, "stage3", folder, logs / "probe-resume.jsonl", layers)
    # last.ckpt was written when training stopped; Lightning resumes such a checkpoint at the next epoch
    resumed = run("resume", mmlatent("fit", "-c", stage3[0][0], *stage3[1], f"--trainer.max_steps={STEPS + 1}",
                                     "--trainer.max_epochs=2",
                                     f"--ckpt_path=runs/{flag.recipes}/stage3/checkpoints/last.ckpt"), cwd, logs)
    resumed_steps = [json.loads(x)["step"] for x in (logs / "probe-resume.jsonl").read_text().splitlines()] if (
        logs / "probe-resume.jsonl").is_file() else []
    result["checks"]["save_resume"] = resumed.returncode == 0 and resumed_steps == [STEPS + 1]
    export = run("export", mmlatent("export", f"runs/{flag.recipes}/stage3/checkpoints/last.ckpt", "export", "--overwrite"),
                 cwd, logs)
    result["checks"]["export"] = export.returncode == 0
    gen = run("generate", [sys.executable, str(Path(__file__).resolve()), "--generate", "export"], cwd, logs)
    result["checks"]["reload_generate"] = gen.returncode == 0
    result["stages"]["export"] = {"peak_gib": round(export.peak_bytes / GiB, 2), "seconds": export.seconds}
    result["stages"]["generate"] = {"peak_gib": round(gen.peak_bytes / GiB, 2), "seconds": gen.seconds}
    result["ok"] = all(result["checks"].values())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(FLAGSHIPS), choices=list(FLAGSHIPS))
    ap.add_argument("--text-layers", type=int, default=None, help="decoder layers (default: as released)")
    ap.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: as released)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "rehearsal", help="working folder (models, shards, runs)")
    ap.add_argument("--headroom-gib", type=float, default=3.0, help="memory to leave free beyond the prediction")
    ap.add_argument("--keep", action="store_true", help="keep each model's folder, checkpoints and export")
    ap.add_argument("--generate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        return generate_check(args.generate)

    from mmlatent.data.synthetic_tokenizer import build_synthetic_tokenizer

    build_synthetic_tokenizer()
    args.work.mkdir(parents=True, exist_ok=True)
    runtime = baseline_bytes(args.work)
    t0 = time.perf_counter()
    results = []
    layers = {"text": args.text_layers, "vision": args.vision_layers}
    for name in args.models:
        t = time.perf_counter()
        res = rehearse(name, FLAGSHIPS[name], args.work, layers, args.headroom_gib, runtime, args.keep)
        res["minutes"] = round((time.perf_counter() - t) / 60, 1)
        results.append(res)
        stages = res["stages"]
        trained = [v for k, v in stages.items() if k.startswith("stage")]
        if trained:
            worst = max(abs(v["error"]) for v in trained)
            print(f"{name}: peak {max(v['peak_gib'] for v in trained):.2f} GiB; "
                  + "; ".join(f"{k} {v['peak_gib']:.2f} GiB measured, {v['predicted_gib']:.2f} predicted "
                              f"({v['error']:+.1%}), {v['seconds_per_step']} s/step, {v['tokens_per_step']} tokens"
                              for k, v in stages.items() if k.startswith("stage"))
                  + f"; worst prediction error {worst:.1%}"
                  + f"; save->resume->export->reload->generate: {'ok' if res.get('ok') else res.get('checks')}", flush=True)
        else:
            print(f"{name}: {res.get('skipped') or res.get('failed')}", flush=True)
        if not args.keep:
            shutil.rmtree(args.work / (name + "".join(f"-{k[0]}{v}" for k, v in layers.items() if v)), ignore_errors=True)
    summary = {
        "models": results, "minutes": round((time.perf_counter() - t0) / 60, 1), "runtime_gib": round(runtime / GiB, 2),
        "within_15pct": all(abs(v["error"]) <= 0.15 for r in results for k, v in r["stages"].items() if k.startswith("stage")),
        "setting": "CPU, bf16 weights, batch 1, 1 step per stage (2 for the resumed stage 3), 1 question + 1 aux image per sample",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
