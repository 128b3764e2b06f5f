"""The benchmark scripts are run by hand, not in CI, so their code paths that import from mmlatent are
checked here: every `from mmlatent... import name` in `benchmarks/` (including those inside functions)
names something that exists, and the rehearsal's reload-and-generate check runs on a tiny export."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("*.py"))


def _mmlatent_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmlatent":
            for alias in node.names:
                yield node.module, alias.name, node.lineno


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_mmlatent_import_of_a_benchmark_resolves(script):
    for module, name, line in _mmlatent_imports(script):
        imported = importlib.import_module(module)
        assert hasattr(imported, name) or importlib.util.find_spec(f"{module}.{name}"), (
            f"{script.name}:{line}: {module} has no {name}")


def test_the_rehearsal_reloads_an_export_and_answers_through_a_latent_block(tmp_path):
    import torch

    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    torch.manual_seed(0)
    cfg = preset("tiny-qwen2.5-vl")
    cfg.latent.mode = "thought"
    LatentVLM(cfg).save_pretrained(tmp_path / "export")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rehearsal.py"), "--generate", "export"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["latent_steps"] >= 1
