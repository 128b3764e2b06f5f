"""mmlatent inside the real lmms-eval (marker `harness`: needs the `lmms` extra; `make test-harness`).

- The `latent_vlm` model is registered by the installed extra's entry point, and `python -m lmms_eval
  --model latent_vlm` runs lmms-eval's own `scienceqa_img` and `mmmu_val` tasks (their prompts, generation
  settings and scoring, included from the installed package) on local copies in the Hub's layout, with the
  tiny model exported to a folder. Its responses equal `mmlatent eval`'s on the same questions byte for byte,
  with the task's settings (`--max-new-tokens 16 --stop $'\\n\\n'` for ScienceQA); lmms-eval's own verdicts
  equal those of `--protocol lmms-eval`.
- `lmms_eval.simple_evaluate(model=LatentVLMLmms(pretrained=model))` takes the model in memory.
- Our `lmms-eval` protocols agree with lmms-eval's functions on thousands of generated responses.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mmlatent.evaluation.command import main as eval_main
from mmlatent.evaluation.parsing import eval_open, parse_open_response
from mmlatent.evaluation.protocols import MMMU_PROTOCOLS, SCIENCEQA_PROTOCOLS
from tests.evaluation.test_eval_data import mmmu_rows, png, scienceqa_rows, write_hf

pytestmark = pytest.mark.harness  # lmms-eval is imported inside the tests: without the extra they fail, never skip


def write_scienceqa_configs(root: Path) -> Path:
    """lmms-lab/ScienceQA's layout: config folders named in the README's `configs`, HF Image feature."""
    rows = scienceqa_rows()
    rows += [{**rows[0], "question": "Which colour is the cell?", "choices": ["blue", "green", "red"], "answer": 2},
             {**rows[3], "image": png((10, 20, 200)), "hint": "A hot day.", "answer": 1}]
    write_hf(rows, root / "ScienceQA-FULL" / "test-00000-of-00001.parquet", ["image"])
    write_hf([r for r in rows if r["image"]], root / "ScienceQA-IMG" / "test-00000-of-00001.parquet", ["image"])
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        + "".join(f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
                  for c in ("ScienceQA-FULL", "ScienceQA-IMG"))
        + "---\n"
    )
    return root


def write_mmmu_data(root: Path) -> Path:
    """lmms-lab/MMMU's layout (one `data/` folder, HF Image feature); every tagged image present, as in MMMU."""
    rows = mmmu_rows("validation")
    rows[1]["image_2"] = png((0, 255, 0))
    write_hf(rows, root / "data" / "validation-00000-of-00001.parquet", [f"image_{k}" for k in range(1, 8)])
    return root


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_model):
    """The exported tiny model, the two local tasks (lmms-eval's own yaml, included) and their data."""
    import lmms_eval

    lmms_tasks = Path(lmms_eval.__file__).parent / "tasks"
    tmp = tmp_path_factory.mktemp("harness")
    export = tiny_model.save_pretrained(tmp / "export")
    sqa, mmmu = write_scienceqa_configs(tmp / "ScienceQA"), write_mmmu_data(tmp / "MMMU")
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "scienceqa_img_local.yaml").write_text(
        f"include: {lmms_tasks / 'scienceqa' / 'scienceqa_img.yaml'}\ntask: scienceqa_img_local\n"
        f"dataset_path: {sqa}\ndataset_kwargs: {{}}\n")
    (tasks / "mmmu_val_local.yaml").write_text(
        f"include: {lmms_tasks / 'mmmu' / 'mmmu_val.yaml'}\ntask: mmmu_val_local\ntag: []\n"
        f"dataset_path: {mmmu}\ndataset_kwargs: {{}}\n")
    return {"tmp": tmp, "export": Path(export), "sqa": sqa, "mmmu": mmmu, "tasks": tasks}


UNTIL_CONTEXTS = ["Which colour?", "What is it?\nA. cat\nB. dog", "Name it."]


@pytest.fixture(scope="module")
def talkative():
    """A tiny model whose greedy answers hold text to cut and score. Randomly initialised, an answer is often
    one token repeated, or ends at once, and `\\n` repeated strips to nothing; so `<|im_end|>`'s logit is held
    at 0 (answers run to `max_new_tokens`) and the first init seed whose answers to `UNTIL_CONTEXTS` hold text
    is taken (deterministic on CPU)."""
    import torch

    from mmlatent.model.generation import GenerationConfig
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    red = open_png(png((255, 0, 0)))
    for seed in range(20):
        torch.manual_seed(seed)
        model = LatentVLM(preset("tiny")).eval()
        head = model.backbone.transformers_model.get_output_embeddings()
        with torch.no_grad():
            head.weight[model.ids.turn_end] = 0
            if getattr(head, "bias", None) is not None:
                head.bias[model.ids.turn_end] = -1e4
        answers = model.generate([[red]] * 3, UNTIL_CONTEXTS, GenerationConfig(max_new_tokens=12))
        if max(len(g.text) for g in answers) >= 4:
            return model
    raise AssertionError("no init seed in 0..19 gives the tiny model an answer with text")


def lmms_samples(out: Path, task: str) -> list[dict]:
    [path] = sorted(out.rglob(f"*samples_{task}.jsonl"))
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])


def response(sample: dict) -> str:
    """The (filtered) response of a logged lmms-eval sample (a string, or a one-element list)."""
    resp = sample["filtered_resps"]
    return resp[0] if isinstance(resp, list) else resp


def mmlatent_samples(out: Path, argv: list[str]) -> list[dict]:
    eval_main(argv + ["--output", str(out), "--no-progress", "--device", "cpu", "--batch-size", "2"])
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_lmms_eval_cli_answers_as_mmlatent_eval(harness, capsys):
    h = harness
    out = h["tmp"] / "lmms-out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(h["tmp"] / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "latent_vlm", "--model_args", f"pretrained={h['export']},batch_size=2",
           "--tasks", "scienceqa_img_local,mmmu_val_local", "--include_path", str(h["tasks"]), "--device", "cpu",
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    # lmms-eval exits 0 after an error too: the samples files say whether it ran
    assert run.returncode == 0 and list(out.rglob("*samples_*.jsonl")), run.stdout[-3000:] + run.stderr[-3000:]

    cache = ["--cache-dir", str(h["tmp"] / "datasets-cache")]
    ours = mmlatent_samples(h["tmp"] / "sqa-out", ["--task", "scienceqa", "--data", str(h["sqa"]), "--subset", "img",
                            "--model", str(h["export"]), "--max-new-tokens", "16", "--stop", "\n\n", "--protocol", "lmms-eval", *cache])
    theirs = lmms_samples(out, "scienceqa_img_local")
    assert len(theirs) == len(ours) == 4
    assert [s["input"] for s in theirs] == [r["prompt"].removeprefix("<image 1>") for r in ours]  # the same text
    assert [response(s) for s in theirs] == [r["response"] for r in ours]  # byte for byte
    assert [s["exact_match"] == 1.0 for s in theirs] == [r["correct"] for r in ours]  # lmms-eval's verdicts

    ours = mmlatent_samples(h["tmp"] / "mmmu-out", ["--task", "mmmu", "--data", str(h["mmmu"]), "--split", "validation",
                            "--model", str(h["export"]), "--max-new-tokens", "128", "--stop", "\n\n", "--protocol", "lmms-eval", *cache])
    theirs = lmms_samples(out, "mmmu_val_local")
    assert [s["input"] for s in theirs] == [r["prompt"] for r in ours]  # tags in place, as our prompt text shows them
    assert [response(s) for s in theirs] == [r["response"] for r in ours]
    for s, r in zip(theirs, ours):
        [parsed] = s["mmmu_acc"]["parsed_pred"]
        if r["question_type"] == "open":
            assert sorted(map(str, parsed)) == sorted(map(str, r["parsed"]))
        elif r["prediction"] is not None:  # where ours is None lmms-eval drew a random letter
            assert parsed == r["prediction"]


def test_simple_evaluate_takes_a_model_in_memory(harness, tiny_model):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from mmlatent.evaluation.lmms_model import LatentVLMLmms

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm = LatentVLMLmms(pretrained=tiny_model, batch_size=3, latent=False)
    results = simple_evaluate(model=lm, tasks=["scienceqa_img_local"], task_manager=TaskManager(include_path=str(harness["tasks"])),
                              log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"]["scienceqa_img_local"], key=lambda s: s["doc_id"])
    ours = mmlatent_samples(harness["tmp"] / "mem-out", ["--task", "scienceqa", "--data", str(harness["sqa"]), "--subset", "img",
                            "--model", str(harness["export"]), "--max-new-tokens", "16", "--stop", "\n\n", "--no-latent",
                            "--protocol", "lmms-eval", "--cache-dir", str(harness["tmp"] / "datasets-cache")])
    assert [response(s) for s in samples] == [r["response"] for r in ours]
    acc = results["results"]["scienceqa_img_local"]["exact_match,none"]
    assert acc == pytest.approx(sum(r["correct"] for r in ours) / len(ours))


def test_bad_model_args_fail_with_one_line(tiny_model):
    from mmlatent.evaluation.lmms_model import LatentVLMLmms

    with pytest.raises(ValueError, match=r"unknown model_args \['latnet'\]"):
        LatentVLMLmms(pretrained=tiny_model, latnet=False)
    with pytest.raises(ValueError, match="latent_intervention='shuffle'"):
        LatentVLMLmms(pretrained=tiny_model, latent_intervention="shuffle")


FRAGMENTS = ["A", "B", "C", "D", "E", "a", "b", "(A)", "(B)", "(C)", "A.", "B.", "C.", "D.", "The answer is ", "the answer is ",
             "Answer:", " ", " ", "\n", ".", ",", ":", "BECAUSE", "CAB", "cat", "dog", "Dog", "no", "not", "yes",
             "big fish", "fish", "is", "so", "option", "1", "2.5", "=", "'", "!", "?"]


def random_responses(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 9))) if rng.random() < 0.5
            else "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 6))) for _ in range(n)]


def test_lmms_eval_protocols_agree_with_lmms_eval_code(monkeypatch):
    """Letter for letter against the installed lmms-eval's own functions, on generated responses (its random
    fallback replaced by a marker, so "no letter" is compared too)."""
    import importlib

    from lmms_eval.tasks._task_utils import mmmu_mcq_utils

    sqa_utils = importlib.import_module("lmms_eval.tasks.scienceqa.utils")
    mmmu_utils = importlib.import_module("lmms_eval.tasks.mmmu.utils")

    class Marker:
        @staticmethod
        def choice(seq):
            return "RANDOM"

    monkeypatch.setattr(mmmu_mcq_utils, "random", Marker)
    options = ["cat", "dog", "bird", "big fish"]
    responses = random_responses(4000) + ["The answer is B. A cat.", "B.", "A. cat", "b", " (C) ", ""]
    for response in responses:
        ours = SCIENCEQA_PROTOCOLS["lmms-eval"].letter(response, options)
        for gold in range(4):
            theirs = sqa_utils.sqa_process_results({"choices": options, "answer": gold}, [response])["exact_match"]
            assert theirs == float(ours == "ABCD"[gold]), (response, gold)
        theirs = mmmu_mcq_utils.parse_mmmu_multi_choice_response(response, list("ABCD"), dict(zip("ABCD", options)))
        assert (MMMU_PROTOCOLS["lmms-eval"].letter(response, options) or "RANDOM") == theirs, response
        for gold in ("2.5", "dog", "c", ["1", "2.50"]):
            theirs = mmmu_utils.parse_open_response(response)
            assert set(parse_open_response(response)) == set(theirs), response
            assert eval_open(gold, parse_open_response(response)) == mmmu_utils.eval_open(gold, theirs), (response, gold)


def request(kind: str, args: tuple, doc_id: int = 0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": args[4], "doc_id": doc_id, "repeats": 1})


def test_loglikelihood_scores_the_greedy_continuation_highest(talkative):
    from mmlatent.evaluation.lmms_model import LatentVLMLmms
    from mmlatent.model.generation import GenerationConfig

    lm = LatentVLMLmms(pretrained=talkative)
    lm.task_dict = {"t": {"test": [{"image": png((200, 0, 0))}]}}
    visual = lambda doc: [open_png(doc["image"])]  # noqa: E731
    context = "Which colour?\nA. red\nB. green"
    [g] = talkative.generate([visual(lm.task_dict["t"]["test"][0])], [context], GenerationConfig(max_new_tokens=3, latent=False))
    greedy = talkative.tokenizer.decode(g.token_ids[:3])
    assert talkative.tokenizer(greedy, add_special_tokens=False)["input_ids"] == g.token_ids[:3]  # round-trips
    other = talkative.tokenizer.decode(g.token_ids[:2] + [g.token_ids[2] + 1])
    (lp_greedy, is_greedy), (lp_other, other_greedy) = lm.loglikelihood(
        [request("loglikelihood", (context, c, visual, 0, "t", "test")) for c in (greedy, other)])
    assert is_greedy and not other_greedy and lp_other < lp_greedy < 0


def test_generation_honours_until_and_places_images_at_their_tags(talkative):
    from mmlatent.evaluation.lmms_model import LatentVLMLmms, user_turn
    from mmlatent.model.generation import GenerationConfig

    red, blue = (open_png(png(c)) for c in ((255, 0, 0), (0, 0, 255)))
    assert user_turn("Is <image 3> like <image 1>? <image 3>", [red, blue], True) == ["Is ", 1, " like ", 0, "? <image 3>"]
    assert user_turn("Is <image 3> like <image 1>?", [red, blue], False) == [0, 1, "Is <image 3> like <image 1>?"]
    assert user_turn("<image> and <image>", [red, blue], True) == [0, " and ", 1]

    lm = LatentVLMLmms(pretrained=talkative, batch_size=2)
    lm.task_dict = {"t": {"test": [{}, {}, {}]}}
    contexts = UNTIL_CONTEXTS
    full = [g.text for g in talkative.generate([[red]] * 3, contexts, GenerationConfig(max_new_tokens=12))]
    longest = max(full, key=len)  # >= 4 characters (the fixture's choice)
    stop = longest[len(longest) // 2 :][:2]  # a piece from the middle of an answer: answers are cut right before it
    gen = {"until": [stop], "max_new_tokens": 12, "temperature": 0, "do_sample": False}
    out = lm.generate_until([request("generate_until", (c, gen, lambda doc: [red], i, "t", "test"), i) for i, c in enumerate(contexts)])
    assert out == [text.split(stop)[0] for text in full]
    with pytest.raises(ValueError, match="num_beams=4"):
        lm.generate_until([request("generate_until", ("x", {"num_beams": 4}, lambda doc: [], 0, "t", "test"))])


def open_png(image: dict):
    """A PIL image from a fixture's `{bytes, path}`."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
