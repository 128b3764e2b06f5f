"""Batched generation over a benchmark split, official scoring, and the output files.

Prompts are rendered by the training `Processor` (mmlatent's one chat template, `mmlatent.chat_template`): the
question's system turn (its own, else the model's `system_prompt`), the question as a user turn, and the
opened assistant turn. With latent reasoning allowed the model decides
whether and where it opens a latent block, and each answer records whether it did (`trigger_rate` in the
results); `open_latent` ends every prompt with `<|latent_start|>` instead (a forced start); with latent
reasoning off, `<|latent_start|>` is forbidden and the model answers in text. `latent_intervention` replaces
the latent inputs (zeros, noise, another question's) to measure how much the answers depend on them. Questions are sorted by prompt length before batching, so a batch pads little
and the KV-cached loop of `generate_from_prompts` serves B questions per forward; the answers go back to
dataset order. The trade-off: a length pass renders every prompt's ids once more (text only, no pixels)
before generation starts.

Outputs in OUT/: `samples.jsonl` (one line per question), `results.json` (overall and breakdowns),
`results.png` (chart) and, for MMMU, `submission.json` in the official `{id: prediction}` form.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmlatent.atomic import write_text
from mmlatent.data.processor import Processor, ProcessorConfig, SequenceLayout
from mmlatent.evaluation.metrics import overall, wilson_interval
from mmlatent.scoring.protocols import judge
from mmlatent.evaluation.question import Question, Task
from mmlatent.evaluation.tasks import EvalData
from mmlatent.model.generation import GenerationConfig, Generated, LatentNoise, generate_voted
from mmlatent.model.interventions import Intervention
from mmlatent.model.latent_vlm import LatentVLM


@dataclass
class EvalConfig:
    """How to run the model on a benchmark."""

    batch_size: int = 16
    """Questions per generation batch."""
    latent: bool = True
    """Allow latent blocks (the model opens them itself). False: text only, `<|latent_start|>` forbidden."""
    open_latent: bool = False
    """End every prompt with `<|latent_start|>`, so each answer starts in a latent block (needs `latent`)."""
    latent_intervention: Intervention = "none"
    """Replace every latent input: `zero`, `noise` (Gaussian with the input's norm), `swap` (another
    question's latents from the same batch; needs `batch_size` >= 2, and a last question that would be alone
    in its batch joins the one before), or `none`."""
    max_new_tokens: int = 128
    """Most generated positions per question (text tokens and latent steps)."""
    stop: tuple[str, ...] = ()
    """Stop strings (lmms-eval's `until`): each answer is cut before the first one it contains. Decoding runs
    on to the end-of-turn token or `max_new_tokens`; what comes after a stop string never changes what
    came before it, so the cut text is what stopping there gives (the counts include the positions after)."""
    trajectories: int = 1
    """Test-time scaling: trajectories per question, each with its own latent noise; the answer is their
    majority vote over parsed predictions (recorded per question in samples.jsonl as `votes`)."""
    latent_noise: LatentNoise = "none"
    """The trajectories' latent noise (needed when `trajectories` > 1): `gaussian`, `dropout` (on the vectors)
    or `mc_dropout` (the LQ-Former's dropout active; thought mode)."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise, or the drop probability of `dropout` and `mc_dropout`."""
    seed: int = 0
    """Seed of the latent noise (trajectory m of every question draws from a stream seeded by it and m)."""
    sort_by_length: bool = True
    """Batch questions of similar prompt length together (less padding); outputs keep dataset order."""
    progress: bool = True
    """Show a progress bar."""


def cut_at_stop(text: str, stop: tuple[str, ...] | list[str]) -> str:
    """`text` up to the first occurrence of any stop string (lmms-eval's `until`); empty strings are ignored."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


def _no_pixels(_image: object) -> Tensor:
    return torch.zeros(0)


class PromptRenderer:
    """`Question` -> prompt ids (L,) and images (N_img, 3, H, W), rendered like a training sample."""

    def __init__(self, model: LatentVLM, open_latent: bool):
        cfg = ProcessorConfig(max_length=sys.maxsize)  # evaluation never drops or cuts a question
        tok, T, system = model.tokenizer, model.tokens_per_image, model.cfg.system_prompt
        self.processor = Processor(tok, model.backbone.image_transform(train=False), T, SequenceLayout(), cfg,
                                   system_prompt=system)
        self.ids_only = Processor(tok, _no_pixels, T, SequenceLayout(), cfg, system_prompt=system)  # the length pass
        self.suffix = [model.ids.latent_start] if open_latent else []

    @staticmethod
    def meta(question: Question) -> dict:
        content = [
            {"type": "image", "ref": f"img{item}"} if isinstance(item, int) else {"type": "text", "text": item}
            for item in question.content
        ]
        system = [] if question.system is None else [{"role": "system", "content": [{"type": "text", "text": question.system}]}]
        return {
            "messages": [*system, {"role": "user", "content": content}, {"role": "assistant", "content": []}],
            "answer": "",
        }

    def _prompt(self, processor: Processor, question: Question, images: dict) -> tuple[Tensor, Tensor]:
        refs = {f"img{k}": image for k, image in images.items()}
        sample = processor.render(self.meta(question), refs, key=question.id)
        prompt = sample.input_ids[: sample.prompt_length]  # (L,) up to and including "<|im_start|>assistant\n"
        if self.suffix:
            prompt = torch.cat([prompt, torch.tensor(self.suffix, dtype=prompt.dtype)])  # (L + 1,)
        return prompt, sample.pixel_values

    def length(self, question: Question) -> int:
        return int(self._prompt(self.ids_only, question, {k: None for k in question.image_slots})[0].numel())

    def render(self, question: Question, images: dict) -> tuple[Tensor, Tensor]:
        return self._prompt(self.processor, question, images)


def batches(order: list[int], size: int, min_size: int = 1) -> list[list[int]]:
    """`order` cut into batches of `size`; a last batch smaller than `min_size` joins the one before."""
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    if len(chunks) > 1 and len(chunks[-1]) < min_size:
        chunks[-2:] = [chunks[-2] + chunks[-1]]
    return chunks


def generate_responses(
    model: LatentVLM, data: EvalData, questions: list[Question], cfg: EvalConfig, return_latents: bool = False
) -> list[Generated]:
    """One `Generated` per question, in the order given, from batched greedy decoding (with each answer's
    latent trajectory when `return_latents`)."""
    if not questions:
        return []
    if cfg.open_latent and not cfg.latent:
        raise ValueError("open_latent needs latent reasoning allowed (--latent)")
    swap = cfg.latent_intervention == "swap"
    if swap and cfg.batch_size < 2:
        raise ValueError("latent_intervention swap needs --batch-size >= 2: a question takes another question's "
                         "latents from its batch")
    if swap and len(questions) < 2:
        raise ValueError(f"latent_intervention swap needs at least 2 questions, got {len(questions)}")
    if cfg.trajectories > 1 and cfg.latent_noise == "none":
        raise ValueError(f"--trajectories {cfg.trajectories} needs a --latent-noise: without noise every trajectory "
                         f"is the same greedy answer")
    renderer = PromptRenderer(model, cfg.open_latent)
    order = list(range(len(questions)))
    if cfg.sort_by_length:
        lengths = [renderer.length(q) for q in questions]
        order.sort(key=lengths.__getitem__)
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, latent=cfg.latent, latent_intervention=cfg.latent_intervention,
        return_latents=return_latents, trajectories=cfg.trajectories, latent_noise=cfg.latent_noise,
        noise_std=cfg.noise_std, seed=cfg.seed,
    )
    device = next(model.parameters()).device
    out: list[Generated | None] = [None] * len(questions)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(questions), unit="q", desc=f"eval {data.task.name}", disable=not cfg.progress) as bar:
            for chunk in batches(order, cfg.batch_size, min_size=2 if swap else 1):
                prompts, pixels = [], []
                for i in chunk:
                    ids, px = renderer.render(questions[i], data.images(questions[i]))
                    prompts.append(ids.to(device))
                    if px.shape[0]:
                        pixels.append(px)
                # (N_img, 3, H, W): the batch's images in prompt order
                pixel_values = torch.cat(pixels).to(device) if pixels else torch.zeros(0, 3, 1, 1, device=device)
                answers = generate_voted(model, prompts, pixel_values, gen_cfg, extract=lambda k, text, chunk=chunk:
                                         vote_key(data.task, questions[chunk[k]], cut_at_stop(text, cfg.stop)))
                for i, g in zip(chunk, answers):
                    out[i] = replace(g, text=cut_at_stop(g.text, cfg.stop)) if cfg.stop else g
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def vote_key(task: Task, question: Question, response: str) -> str | None:
    """What a trajectory's vote counts as: its prediction parsed by the task's protocol (the letter of a
    multiple-choice question, the parsed candidates of an open one), None when nothing parses (not counted)."""
    verdict = task.judge(question, response)
    if question.question_type == "multiple-choice":
        return verdict.prediction
    return json.dumps(sorted(map(str, verdict.parsed))) if verdict.parsed else None


def score(
    questions: list[Question], responses: list[str], generated: list[Generated] | None = None, task: Task | None = None
) -> list[dict[str, Any]]:
    """Output lines: id, prompt, response, prediction, correct, unparsed, the gold answer and the category
    fields (plus the normalised candidates of open questions, the chance of an official guess and the
    generation counts). Answers are judged by `task`'s protocol (without a task: MMMU's parser)."""
    records = []
    for k, (q, response) in enumerate(zip(questions, responses)):
        verdict = task.judge(q, response) if task is not None else judge(q.question_type, q.choices, q.gold, response)
        record: dict[str, Any] = {
            "id": q.id,
            "prompt": q.prompt_text(),
            "response": response,
            "prediction": verdict.prediction,
            "correct": verdict.correct,
            "unparsed": verdict.unparsed,
            "answer": q.gold,
            "question_type": q.question_type,
            **q.fields,
        }
        if q.question_type == "open":
            record["parsed"] = verdict.parsed
        if verdict.guess_chance is not None:
            record["guess_chance"] = verdict.guess_chance
        if generated is not None:
            record["latent_steps"] = generated[k].latent_steps
            record["entered_latent"] = generated[k].entered_latent
            record["positions"] = generated[k].positions
            if generated[k].votes is not None:  # test-time scaling: how the trajectories voted
                record["votes"] = generated[k].votes
        records.append(record)
    return records


def summarize(data: EvalData, records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The results object: where the data came from, the scoring protocol, overall accuracy, unparsed count
    (and, where the protocol's official code guesses, the expected accuracy with its guesses) and breakdowns."""
    total = overall(records)
    protocol = data.task.protocol
    out = {
        "task": data.task.name,
        "data": data.data,
        "split": data.split,
        "subset": data.task.subset,
        "protocol": protocol.name,
        "protocol_source": protocol.source,
        **total.as_dict(),
        "acc_ci95": wilson_interval(total.correct, total.scored),
    }
    if protocol.guesses and total.scored:
        out["acc_if_guessed"] = (total.correct + sum(r.get("guess_chance", 0.0) for r in records)) / total.scored
    out["breakdown"] = data.task.breakdown(records)
    if records and "entered_latent" in records[0]:  # answers generated here (not re-scored ones)
        out["trigger_rate"] = sum(bool(r["entered_latent"]) for r in records) / len(records)
        out["positions_per_answer"] = sum(r["positions"] for r in records) / len(records)
    return {**out, **extra}


def submission(records: list[dict[str, Any]]) -> dict[str, str]:
    """MMMU's official `{id: prediction}`: the letter for multiple choice ("" when unparsed, which the
    official scorer marks wrong), the response for open questions."""
    return {r["id"]: r["prediction"] if r["prediction"] is not None else "" for r in records}


def write_outputs(out_dir: str | Path, data: EvalData, records: list[dict[str, Any]], results: dict[str, Any]) -> Path:
    """Write samples.jsonl, results.json, results.png and (MMMU) submission.json into `out_dir`."""
    from mmlatent.evaluation.chart import plot_results

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if data.task.name == "mmmu":
        write_text(out / "submission.json", json.dumps(submission(records), indent=2, ensure_ascii=False) + "\n")
    plot_results(results, out / "results.png")
    return out


def evaluate(
    model: LatentVLM, data: EvalData, cfg: EvalConfig, out_dir: str | Path | None = None, model_name: str = ""
) -> dict[str, Any]:
    """Generate, score and (with `out_dir`) write every output. Returns the results object."""
    t0 = time.perf_counter()
    generated = generate_responses(model, data, data.questions, cfg)
    seconds = time.perf_counter() - t0
    records = score(data.questions, [g.text for g in generated], generated, data.task)
    results = summarize(
        data, records, model=model_name, eval=asdict(cfg),
        timing={"seconds": round(seconds, 3), "seconds_per_question": round(seconds / max(len(records), 1), 4)},
    )
    if out_dir is not None:
        write_outputs(out_dir, data, records, results)
    return results


def read_responses(path: str | Path) -> dict[str, str]:
    """`{id: response}` from a JSON-lines file of `{"id", "response"}` objects; an id given twice is an error
    naming both lines (which of two answers to score is not ours to guess)."""
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                qid, response = str(row["id"]), str(row["response"] if row["response"] is not None else "")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'id' and 'response' ({err})") from err
            if qid in lines:
                raise ValueError(f"{path}:{n}: response id {qid!r} appears twice (first on line {lines[qid]})")
            out[qid], lines[qid] = response, n
    return out


def rescore(data: EvalData, responses_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score saved raw responses without a model. Questions with no response are left out and counted
    (`missing`), as the official script scores only what it is given; an id the split lacks is an error."""
    responses = read_responses(responses_path)
    known = data.by_id()
    unknown = [i for i in responses if i not in known]
    if unknown:
        raise ValueError(
            f"{len(unknown)} response id(s) not in {data.task.name} {data.split} (subset {data.task.subset}), "
            f"e.g. {unknown[:3]}"
        )
    answered = [q for q in data.questions if q.id in responses]
    records = score(answered, [responses[q.id] for q in answered], task=data.task)
    results = summarize(data, records, responses=str(responses_path), missing=len(data.questions) - len(answered))
    if out_dir is not None:
        write_outputs(out_dir, data, records, results)
    return results
