"""Prompt rendering, batched generation, scoring and the output files, with the tiny model on fixtures."""

from __future__ import annotations

import json

import pytest

from mmlatent.evaluation.runner import EvalConfig, PromptRenderer, evaluate, generate_responses, rescore
from mmlatent.evaluation.tasks import load_eval_data
from tests.evaluation.test_eval_data import write_mmmu, write_scienceqa


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def mmmu(tmp_path_factory, cache):
    return load_eval_data("mmmu", str(write_mmmu(tmp_path_factory.mktemp("mmmu"), "subjects")), "validation", cache_dir=cache)


@pytest.fixture(scope="module")
def scienceqa(tmp_path_factory, cache):
    return load_eval_data("scienceqa", str(write_scienceqa(tmp_path_factory.mktemp("sqa"), "data")), "test", cache_dir=cache)


def test_prompts_are_chatml_with_images_in_place(tiny_model, mmmu):
    q = next(q for q in mmmu.questions if q.id == "validation_Art_1")  # two images, named in the options
    T = tiny_model.tokens_per_image
    ids, pixels = PromptRenderer(tiny_model, open_latent=True).render(q, mmmu.images(q))
    assert pixels.shape[0] == 2 and int((ids == tiny_model.ids.image).sum()) == 2 * T
    text = tiny_model.tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nWhich picture is a copy?\nA. ")
    assert text.endswith("directly.<|im_end|>\n<|im_start|>assistant\n<|latent_start|>")
    first_image = text.index("<|image|>")
    assert text[first_image - 3 : first_image] == "A. " and "B. " not in text[:first_image]

    plain, _ = PromptRenderer(tiny_model, open_latent=False).render(q, mmmu.images(q))
    assert plain.tolist() == ids[:-1].tolist()  # the same prompt without the opened latent block
    assert PromptRenderer(tiny_model, open_latent=False).length(q) == plain.numel()


def test_batched_equals_one_by_one_latent_on(tiny_model, scienceqa):
    qs = scienceqa.questions
    cfg = dict(max_new_tokens=10, progress=False, open_latent=True)
    batched = generate_responses(tiny_model, scienceqa, qs, EvalConfig(batch_size=4, **cfg))
    single = generate_responses(tiny_model, scienceqa, qs, EvalConfig(batch_size=1, **cfg))
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(g.latent_steps >= 1 for g in batched)  # every answer started inside a latent block
    assert all(g.token_ids[0] == tiny_model.ids.latent for g in batched)


def test_no_latent_means_no_latent_steps(tiny_model, scienceqa):
    out = generate_responses(tiny_model, scienceqa, scienceqa.questions, EvalConfig(latent=False, max_new_tokens=6, progress=False))
    assert len(out) == 4 and all(g.latent_steps == 0 for g in out)


def test_swap_answers_every_question_with_donors_from_other_questions(tiny_model, mmmu):
    """4 questions at batch size 3 used to end in a last batch of one question, which raised "needs at least
    two questions ... (batch size >= 2)" after 3 answers; every batch now holds two questions or more."""
    cfg = EvalConfig(batch_size=3, latent_intervention="swap", open_latent=True, max_new_tokens=4, progress=False)
    out = generate_responses(tiny_model, mmmu, mmmu.questions, cfg)
    assert len(out) == 4 and all(g is not None and g.entered_latent for g in out)
    with pytest.raises(ValueError, match="swap needs at least 2 questions, got 1"):
        generate_responses(tiny_model, mmmu, mmmu.questions[:1], cfg)
    with pytest.raises(ValueError, match="swap needs --batch-size >= 2"):
        generate_responses(tiny_model, mmmu, mmmu.questions, EvalConfig(batch_size=1, latent_intervention="swap"))


def test_evaluate_writes_every_output(tiny_model, mmmu, tmp_path):
    results = evaluate(tiny_model, mmmu, EvalConfig(batch_size=2, max_new_tokens=4, progress=False, open_latent=True), tmp_path, "tiny")
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [q.id for q in mmmu.questions]  # dataset order, not length order
    for r in lines:
        assert {"id", "prompt", "response", "prediction", "correct", "unparsed", "subject", "discipline"} <= set(r)
        assert r["latent_steps"] >= 1 and r["entered_latent"] is True  # the prompt opened the block
    assert results["trigger_rate"] == 1.0
    lo, hi = results["acc_ci95"]
    assert 0.0 <= lo <= results["acc"] <= hi <= 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["num"] == 4 and set(results["breakdown"]) == {"overall", "disciplines", "subjects"}
    submission = json.loads((tmp_path / "submission.json").read_text())
    assert set(submission) == {q.id for q in mmmu.questions} and all(isinstance(v, str) for v in submission.values())
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rescore_reproduces_known_accuracy(mmmu, tmp_path):
    responses = [
        {"id": "validation_Accounting_1", "response": "The answer is (B)."},  # right
        {"id": "validation_Accounting_2", "response": "So the sum is 1,000."},  # right (a listed answer)
        {"id": "validation_Art_1", "response": "no idea"},  # unparsed, wrong
    ]  # Clinical_Medicine_1 has no response: missing, not scored
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in responses))
    results = rescore(mmmu, path, tmp_path / "out")
    assert (results["num"], results["correct"], results["unparsed"], results["missing"]) == (3, 2, 1, 1)
    assert results["breakdown"]["disciplines"]["Business"]["acc"] == 1.0
    assert results["breakdown"]["disciplines"]["Art & Design"] == {"num": 1, "correct": 0, "acc": 0.0, "unparsed": 1}
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert submission == {"validation_Accounting_1": "B", "validation_Accounting_2": "So the sum is 1,000.", "validation_Art_1": ""}

    path.write_text(json.dumps({"id": "validation_Physics_9", "response": "A"}) + "\n")
    with pytest.raises(ValueError, match="not in mmmu validation"):
        rescore(mmmu, path)


def test_public_generate_renders_and_answers_like_the_eval_runner(tiny_model, mmmu):
    """`LatentVLM.generate(images, prompts)` builds the same prompt ids as evaluation (images at their
    `<image>` markers) and gives the same answers, batched or one at a time."""
    from mmlatent.model.generation import GenerationConfig
    from mmlatent.model.latent_vlm import IMAGE_MARKER

    q = next(q for q in mmmu.questions if q.id == "validation_Art_1")  # two images, inside the text
    images = mmmu.images(q)
    want, _ = PromptRenderer(tiny_model, open_latent=False).render(q, images)
    text = "".join(IMAGE_MARKER if isinstance(item, int) else item for item in q.content)
    pictures = [images[item] for item in q.content if isinstance(item, int)]
    assert tiny_model.prompt(pictures, text)[0].tolist() == want.tolist()
    cfg = GenerationConfig(max_new_tokens=12)
    got = tiny_model.generate([pictures], [text], cfg)
    runner = generate_responses(tiny_model, mmmu, [q], EvalConfig(max_new_tokens=12, progress=False))
    assert got[0].token_ids == runner[0].token_ids and got[0].text == runner[0].text

    batch = tiny_model.generate([pictures, pictures[0]], [text, "What colour is it?"], cfg)
    alone = tiny_model.generate([pictures[0]], ["What colour is it?"], cfg)
    assert batch[0].token_ids == got[0].token_ids and batch[1].token_ids == alone[0].token_ids
    with pytest.raises(ValueError, match="1 <image> markers for 2 images"):
        tiny_model.generate([pictures], [f"{IMAGE_MARKER} only one"], cfg)
