"""Export and loading: checkpoint -> Hub-ready folder -> `LatentVLM`, exactly; model card; push to the Hub.

One tiny checkpoint (weights perturbed away from any fresh init) is exported once through the `mmlatent
export` command with a fake `HfApi`; the tests then check the folder, the round trip (identical logits,
identical greedy generations, bit-identical re-save), the card's metadata as `huggingface_hub` parses it,
and the push flags. Nothing touches the network: sockets are blocked while loading.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from mmlatent.model.generation import GenerationConfig, generate_from_prompts
from mmlatent.model.latent_vlm import LatentVLM

REPO_ID = "mmlatent-tests/tiny-latent"


class FakeHfApi:
    """Records what `push_folder` asks of the Hub; optionally fails like an unreachable Hub."""

    calls: list[tuple[str, tuple, dict]] = []
    fail_with: BaseException | None = None

    def __init__(self, **kwargs):
        FakeHfApi.calls.append(("init", (), kwargs))

    def _record(self, name, args, kwargs):
        if FakeHfApi.fail_with is not None:
            raise FakeHfApi.fail_with
        FakeHfApi.calls.append((name, args, kwargs))

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", args, kwargs)

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", args, kwargs)

    def upload_folder(self, *args, **kwargs):
        self._record("upload_folder", args, kwargs)
        assert Path(kwargs["folder_path"], "config.json").exists()
        return "commit"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A perturbed tiny checkpoint, its results and stage configs, exported and 'pushed' through the CLI."""
    import lightning

    from mmlatent.hub.export import main
    from mmlatent.training.module import LatentVLMModule

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    module = LatentVLMModule()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))  # no weight equals a fresh init (the sketch head starts as identity)
    ckpt = root / "last.ckpt"
    torch.save(
        {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
         "pytorch-lightning_version": lightning.__version__},
        ckpt,
    )
    results = root / "results.json"
    results.write_text(json.dumps([
        {"task": "mmmu", "split": "validation", "overall": {"accuracy": 0.31, "count": 900}, "unparsed": 4},
        {"task": "scienceqa", "split": "test", "accuracy": 0.52, "protocol": "llava"},
    ]))
    stages = []
    for i in (1, 2, 3):
        stages.append(root / "configs" / f"stage{i}.yaml")
        stages[-1].parent.mkdir(exist_ok=True)
        stages[-1].write_text(f"model:\n  stage:\n    name: stage{i}\n")
    out = root / "out"
    FakeHfApi.calls, FakeHfApi.fail_with = [], None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("mmlatent.hub.publish.HfApi", FakeHfApi)
        mp.setenv("HF_TOKEN", "hf_test_token")
        code = main([
            str(ckpt), str(out), "--push-to-hub", REPO_ID, "--private", "--revision", "exp1",
            "--results", str(results), "--stage-configs", *map(str, stages), "--max-shard-size", "300KB",
            "--card.datasets", '["org/latent-cot"]', "--card.base_models", '["Qwen/Qwen2.5-0.5B-Instruct"]',
            "--card.tags", '["demo"]',
        ])
    assert code == 0
    return {"module": module.eval(), "out": out, "ckpt": ckpt, "stages": stages, "calls": list(FakeHfApi.calls)}


@pytest.fixture(scope="module")
def loaded(exported):
    """The exported folder loaded back, with sockets and unpickling blocked."""

    def refuse(*args, **kwargs):
        raise AssertionError("loading a local folder must not use the network or unpickle")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(torch, "load", refuse)
        mp.setattr("mmlatent.model.serialization.snapshot_download", refuse)
        return LatentVLM.from_pretrained(exported["out"])


def prompts(model, n_images: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Chat prompts with one image each; the second opens a latent block itself."""
    tok, ids = model.tokenizer, model.ids
    user = tok.encode("user\n")
    assistant = tok.encode("assistant\n")
    out = []
    for i, question in enumerate(["What colour is the red cell's neighbour?", "Follow the arrows."]):
        seq = [ids.turn_start, *user, *[ids.image] * model.tokens_per_image, *tok.encode(question), ids.turn_end,
               *tok.encode("\n"), ids.turn_start, *assistant]
        if i == 1:
            seq.append(ids.latent_start)
        out.append(torch.tensor(seq))
    pixels = torch.randn(n_images, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    return out, pixels


def model_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- the folder


def test_folder_holds_every_part(exported):
    out = exported["out"]
    config = json.loads((out / "config.json").read_text())
    assert config["format_version"] == 1 and config["library_name"] == "mmlatent"
    assert config["model"]["tokenizer"]["name_or_path"] == "." and config["model"]["lm"]["name_or_path"] == "lm"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded past 300KB
    assert all(not k.startswith("backbone.lm.") for k in index["weight_map"])
    assert (out / "lm" / "config.json").exists() and (out / "lm" / "model.safetensors.index.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    image = json.loads((out / "image_processor_config.json").read_text())
    assert image["tokens_per_image"] == 16 and image["image_size"] == [64, 64]
    assert [s["type"] for s in image["transform"]][-1] == "Normalize"
    hparams = json.loads((out / "training" / "hparams.json").read_text())
    assert hparams["stage"]["name"] == "stage1" and hparams["checkpoint"] == "last.ckpt" and "optim" in hparams
    for stage in exported["stages"]:
        assert (out / "training" / stage.name).read_bytes() == stage.read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no temporary folders left


def test_loading_an_export_logs_no_warning(exported, caplog, capfd):
    """A clean load says nothing: transformers used to warn "a model of type `mmlatent` to instantiate a
    model of type ``" on every load (its AutoTokenizer read the folder's config.json without knowing it)."""
    import logging

    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        LatentVLM.from_pretrained(exported["out"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "model of type" not in capfd.readouterr().err


def test_generation_config_round_trips(exported):
    from mmlatent.model.serialization import load_generation_config

    assert load_generation_config(exported["out"]) == exported["module"].gen_cfg


# ---------------------------------------------------------------------------------------------- round trip


def test_loaded_model_has_identical_weights_and_logits(exported, loaded):
    original = exported["module"].model
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [(n, p.requires_grad) for n, p in original.named_parameters()] == [
        (n, p.requires_grad) for n, p in loaded.named_parameters()
    ]
    ps, pixels = prompts(original)
    ids = torch.stack([ps[0], ps[0]])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        want = original(ids, mask, pos, pixel_values=pixels).logits
        got = loaded(ids, mask, pos, pixel_values=pixels).logits
    assert torch.equal(want, got)
    assert not loaded.training and loaded.cfg.tokenizer.name_or_path == str(exported["out"].resolve())


def test_loaded_model_generates_identically(exported, loaded):
    cfg = GenerationConfig(max_new_tokens=12)
    ps, pixels = prompts(loaded)
    want = generate_from_prompts(exported["module"].model, ps, pixels, cfg)
    got = generate_from_prompts(loaded, ps, pixels, cfg)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert got[1].latent_steps >= 1  # the second prompt ran the latent loop


def test_resave_is_bit_identical(exported, loaded, tmp_path):
    from mmlatent.model.serialization import save_pretrained

    save_pretrained(loaded, tmp_path / "again", max_shard_size="300KB", generation=exported["module"].gen_cfg)
    first, again = model_files(exported["out"]), model_files(tmp_path / "again")
    extras = {"README.md", "training/hparams.json", *(f"training/{s.name}" for s in exported["stages"])}
    assert set(first) - extras == set(again)
    assert [name for name in again if again[name] != first[name]] == []


def test_transformers_auto_classes_load_the_folder_with_remote_code(exported, loaded, monkeypatch, tmp_path):
    """The stretch goal: `AutoModel.from_pretrained(folder, trust_remote_code=True)` gives the same model."""
    from transformers import AutoConfig, AutoModel

    from mmlatent.model.latent_vlm import LatentVLM

    # transformers copies the folder's code into its modules cache: a private one, not ~/.cache
    monkeypatch.setattr("transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "modules"))
    out = exported["out"]
    config = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
    assert type(config).__name__ == "LatentVLMConfig" and config.model_type == "mmlatent"
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert isinstance(model, LatentVLM)
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="trust_remote_code"):  # never runs the folder's code unasked
        AutoModel.from_pretrained(str(out))


@pytest.mark.parametrize("variant", ["thought-with-heads", "open-clip"])
def test_round_trip_of_other_model_shapes(variant, tmp_path):
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset
    from mmlatent.model.serialization import save_pretrained

    cfg = preset("tiny-open-clip" if variant == "open-clip" else "tiny")
    if variant == "thought-with-heads":
        cfg.latent.mode, cfg.latent.diffusion_head, cfg.latent.contrastive = "thought", True, True
    torch.manual_seed(1)
    model = LatentVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(model, tmp_path / "m")
    back = LatentVLM.from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ps, pixels = prompts(model)
    cfg_gen = GenerationConfig(max_new_tokens=8)
    assert [g.token_ids for g in generate_from_prompts(back, ps, pixels, cfg_gen)] == [
        g.token_ids for g in generate_from_prompts(model, ps, pixels, cfg_gen)
    ]


# ---------------------------------------------------------------------------------------------- model card


def test_model_card_parses_with_huggingface_hub(exported):
    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported["out"] / "README.md")
    data = card.data
    assert data.library_name == "mmlatent" and data.license == "apache-2.0"
    assert data.base_model == ["Qwen/Qwen2.5-0.5B-Instruct"] and data.datasets == ["org/latent-cot"]
    assert {"mmlatent", "latent-reasoning", "latent-sketch", "stage1", "demo"} <= set(data.tags)
    assert data.model_name == "tiny-latent"
    results = {r.dataset_type: r for r in data.eval_results}
    assert results["MMMU/MMMU"].metric_value == 0.31 and results["MMMU/MMMU"].dataset_split == "validation"
    assert results["derek-thomas/ScienceQA"].metric_value == 0.52
    assert results["derek-thomas/ScienceQA"].metric_name == "Accuracy (llava protocol)"  # each score names its protocol
    header = yaml.safe_load(card.content.split("---")[1])
    assert header["model-index"][0]["results"][0]["metrics"][0]["type"] == "accuracy"
    assert "# tiny-latent" in card.text and "| MMMU (`MMMU/MMMU`) | validation |  | 0.31 | 4 |" in card.text
    assert "| ScienceQA (`derek-thomas/ScienceQA`) | test | llava | 0.52 |  |" in card.text
    assert f'LatentVLM.from_pretrained("{REPO_ID}")' in card.text


def test_base_models_are_read_from_the_config():
    from mmlatent.hub.model_card import base_models
    from mmlatent.model.presets import preset

    assert base_models(preset("tiny")) == []  # random init, synthetic tokenizer
    assert base_models(preset("siglip-qwen2.5-0.5b")) == ["Qwen/Qwen2.5-0.5B-Instruct", "timm/ViT-B-16-SigLIP"]


def test_bad_results_file_names_the_problem(tmp_path):
    from mmlatent.hub.model_card import read_results

    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"task": "mmmu", "split": "validation"}))
    with pytest.raises(ValueError, match="no overall accuracy"):
        read_results(bad)
    bad.write_text(json.dumps({"task": "vqav2", "accuracy": 0.5}))
    with pytest.raises(ValueError, match="add a `dataset` Hub id"):
        read_results(bad)


# ------------------------------------------------------------------------------------------------ the Hub


def test_push_passes_repo_revision_and_private(exported):
    calls = exported["calls"]
    init = [kw for name, _, kw in calls if name == "init"]
    assert init and init[0]["token"] == "hf_test_token"
    (_, args, kwargs), = [c for c in calls if c[0] == "create_repo"]
    assert args == (REPO_ID,) and kwargs["private"] is True and kwargs["exist_ok"] is True
    (_, args, kwargs), = [c for c in calls if c[0] == "create_branch"]
    assert args == (REPO_ID,) and kwargs["branch"] == "exp1"
    (_, _, kwargs), = [c for c in calls if c[0] == "upload_folder"]
    assert kwargs["repo_id"] == REPO_ID and kwargs["revision"] == "exp1"
    assert Path(kwargs["folder_path"]) == exported["out"]


def test_push_model_saves_a_carded_folder_and_uploads_it(loaded, monkeypatch):
    from mmlatent.hub.publish import push_model as push_model_to_hub

    uploaded = {}

    class RecordingApi(FakeHfApi):
        def upload_folder(self, *args, **kwargs):
            folder = Path(kwargs["folder_path"])
            uploaded.update(kwargs, files=sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
            return "commit"

    monkeypatch.setattr("mmlatent.hub.publish.HfApi", RecordingApi)
    push_model_to_hub(loaded, REPO_ID, revision="v2", token="hf_x")
    assert uploaded["repo_id"] == REPO_ID and uploaded["revision"] == "v2"
    assert {"README.md", "config.json", "model.safetensors", "lm/config.json", "tokenizer.json"} <= set(uploaded["files"])
    assert not Path(uploaded["folder_path"]).exists()  # the temporary folder is gone


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("mmlatent.hub.publish.HfApi", FakeHfApi)


def test_push_without_token_is_a_clear_error(exported, no_token, tmp_path, capsys):
    from mmlatent.hub.export import main
    from mmlatent.hub.publish import push_folder as push_to_hub
    from mmlatent.model.serialization import HubAccessError

    with pytest.raises(HubAccessError, match="no Hugging Face token: set the HF_TOKEN"):
        push_to_hub(exported["out"], REPO_ID)
    # the command fails before loading the checkpoint and writes nothing
    assert main([str(exported["ckpt"]), str(tmp_path / "never"), "--push-to-hub", REPO_ID]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_push_without_network_is_a_clear_error(exported, monkeypatch):
    import httpx2

    from mmlatent.hub.publish import push_folder as push_to_hub
    from mmlatent.model.serialization import HubAccessError

    monkeypatch.setattr("mmlatent.hub.publish.HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "fail_with", httpx2.ConnectError("Name or service not known"))
    with pytest.raises(HubAccessError, match="unreachable"):
        push_to_hub(exported["out"], REPO_ID, token="hf_x")


def test_hub_id_resolves_with_snapshot_download(exported, monkeypatch):
    from mmlatent.model import serialization as pretrained

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(repo_id=repo_id, **kwargs)
        return str(exported["out"])

    monkeypatch.setattr(pretrained, "snapshot_download", fake_snapshot_download)
    assert pretrained.resolve_folder(REPO_ID, revision="exp1") == exported["out"]
    assert seen["repo_id"] == REPO_ID and seen["revision"] == "exp1"


def test_uncached_hub_id_offline_is_a_clear_error(monkeypatch):
    from mmlatent.model.serialization import HubAccessError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubAccessError, match="unreachable .*not in the local cache"):
        LatentVLM.from_pretrained("mmlatent-tests/never-downloaded-model")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        LatentVLM.from_pretrained("./missing/export/folder")


# ---------------------------------------------------------------------------------------- safety, atomicity


def test_only_safetensors_and_known_formats_are_read(exported, tmp_path):
    from mmlatent.model.serialization import read_config, read_weights

    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        read_weights(folder)
    config = json.loads((exported["out"] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        read_config(folder)
    config["model"]["lm"]["name_or_path"] = "../../elsewhere"
    (folder / "config.json").write_text(json.dumps(config))
    from mmlatent.model.serialization import loading_config

    with pytest.raises(ValueError, match="points outside the folder"):
        loading_config(read_config(folder), folder)


@pytest.mark.parametrize("part", [".", "lm"])
def test_a_truncated_weights_file_is_one_line_naming_it(exported, tmp_path, capsys, part, synth_dir):
    """A half-copied safetensors file (the folder's own or the LM's) stops the load before any weight is read,
    naming the file; `mmlatent eval --model` prints that one line."""
    import shutil

    from mmlatent.evaluation.command import main

    folder = tmp_path / "copy"
    shutil.copytree(exported["out"], folder)
    weights = sorted((folder / part).glob("*.safetensors"))[-1].relative_to(folder)  # a shard (max 300KB)
    data = (folder / weights).read_bytes()
    (folder / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{folder / weights}: not a complete safetensors file .*truncated"):
        LatentVLM.from_pretrained(folder)
    with pytest.raises(SystemExit) as err:
        main(["--task", "shards", "--data", str(synth_dir / "val"), "--limit", "1", "--model", str(folder),
              "--output", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and f"{folder / weights}: not a complete safetensors file" in lines[-1]


def test_writes_are_atomic_and_never_clobber(loaded, tmp_path):
    from mmlatent.model.serialization import save_pretrained

    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_pretrained(loaded, target)
    name = loaded.cfg.vision.name
    loaded.cfg.vision.name = "hf-hub:org/tower"  # refused inside the write: the target must stay as it was
    try:
        with pytest.raises(ValueError, match="hf-hub"):
            save_pretrained(loaded, target, overwrite=True)
    finally:
        loaded.cfg.vision.name = name
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    save_pretrained(loaded, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folders left


def test_export_help_lists_the_options():
    from mmlatent.hub.export import parser

    text = parser().format_help()
    for option in ("--push-to-hub", "--private", "--revision", "--results", "--stage-configs", "--card.license"):
        assert option in text, option
