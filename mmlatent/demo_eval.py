"""What the demo measures on one seed's trained runs, and how seeds are summarised and printed.

Every mode is scored on the same two held-out splits (walks of the trained lengths, and longer ones) through
`mmlatent eval`'s runner: accuracy with a Wilson 95% interval, the same per hop count, positions per answer,
trigger rate and latent blocks per answer. Beside them stand the reference rows every accuracy must be read
against (always naming the grid's most common colour, and chance). The causal checks are the same for both
modes that reason: the latent model with its latent inputs zeroed, replaced by noise or swapped, and the CoT
baseline with the colour word it read replaced. The latent model is also run with its blocks ended at the
trained length (`block_end: slots`) beside its own decision (`model`), and its thoughts' selection is scored
strictly (each block on its own hop's cell) and leniently (on any cell of the walk).
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from mmlatent.evaluation.metrics import wilson_interval

MODES = ("direct", "cot", "latent")
SPLITS = {"test": "test", "longer": "longer"}
"""Result key -> shard folder of the split under the seed's data folder."""


def evaluate_mode(ckpt: Path, data, latent: bool, max_new_tokens: int, intervention: str = "none",
                  return_latents: bool = False, batch_size: int = 50, block_end: str | None = None):
    """(summary, records, generated, model) of a checkpoint on a split's questions."""
    from mmlatent.evaluation.runner import EvalConfig, generate_responses, score
    from mmlatent.training.checkpoint_reader import load_model

    model = load_model(ckpt)
    if block_end is not None:
        model.cfg.latent.block_end = block_end
    torch.manual_seed(0)  # the noise intervention draws from torch's generator
    cfg = EvalConfig(batch_size=batch_size, latent=latent, max_new_tokens=max_new_tokens,
                     latent_intervention=intervention, progress=False)
    t0 = time.perf_counter()
    generated = generate_responses(model, data, data.questions, cfg, return_latents=return_latents)
    seconds = time.perf_counter() - t0
    records = score(data.questions, [g.text for g in generated], generated)
    for r, g in zip(records, generated):
        r["blocks"] = g.token_ids.count(model.ids.latent_start)
    summary = summarize(records)
    summary.update(seconds_per_question=seconds / max(len(records), 1), checkpoint=str(ckpt))
    return summary, records, generated, model


def _stats(records: list[dict]) -> dict[str, Any]:
    n = len(records)
    right = sum(bool(r["correct"]) for r in records)
    return {
        "accuracy": right / n if n else None,
        "accuracy_ci95": wilson_interval(right, n),
        "questions": n,
        "unparsed": sum(bool(r["unparsed"]) for r in records),
        "positions_per_answer": sum(r["positions"] for r in records) / n if n else None,
        "trigger_rate": sum(bool(r["entered_latent"]) for r in records) / n if n else None,
        "blocks_per_answer": sum(r["blocks"] for r in records) / n if n else None,
    }


def summarize(records: list[dict]) -> dict[str, Any]:
    """The split's numbers, overall and per hop count (`per_hop`)."""
    hops = sorted({int(r["hops"]) for r in records})
    return {**_stats(records), "per_hop": {str(h): _stats([r for r in records if int(r["hops"]) == h]) for h in hops}}


def reference_rows(data, grid: int, palette) -> dict[str, Any]:
    """The majority-colour heuristic and chance on a split, overall and per hop count."""
    from mmlatent.evaluation.heuristics import chance, grid_colours, majority_colour

    rows: dict[str, dict[str, list[float]]] = {"majority_colour": {}, "chance": {}}
    for q in data.questions:
        colours = grid_colours(data.images(q)[0], grid, palette)
        for key in ("all", str(q.fields["hops"])):
            rows["majority_colour"].setdefault(key, []).append(majority_colour(colours, q.choices, q.gold))
            rows["chance"].setdefault(key, []).append(chance(q.choices))
    return {name: {"accuracy": mean(v["all"]), "per_hop": {h: {"accuracy": mean(x)} for h, x in sorted(v.items()) if h != "all"}}
            for name, v in rows.items()}


def checkpoint(out: Path, name: str) -> Path:
    """Where the demo's run `name` under `out` keeps its last checkpoint."""
    return out / name / "checkpoints" / "last.ckpt"


def evaluate_variant(runs: Path, data_dir: Path, demo) -> dict[str, Any]:
    """Every measurement of one seed's runs of one variant (`runs/<run>/checkpoints/last.ckpt`)."""
    from mmlatent.evaluation.cot_intervention import intervene
    from mmlatent.evaluation.runner import EvalConfig
    from mmlatent.evaluation.selection import selection_on_path
    from mmlatent.evaluation.tasks import load_eval_data

    splits = {key: load_eval_data("synthetic", str(data_dir / folder)) for key, folder in SPLITS.items()}
    out: dict[str, Any] = {"reference": {k: reference_rows(d, demo.synth.grid_size, demo.synth.palette) for k, d in splits.items()}}
    cot_tokens = 40 * (max(demo.longer_hops) + 2)  # a text step is about 17 tokens: room for the longest walk
    for mode, ckpt, latent, tokens in (("direct", "direct", False, 16), ("cot", "cot", False, cot_tokens)):
        out[mode] = {}
        for key, data in splits.items():
            out[mode][key], _, generated, model = evaluate_mode(checkpoint(runs, ckpt), data, latent, tokens)
            if mode == "cot" and key == "test":
                cfg = EvalConfig(batch_size=50, latent=False, max_new_tokens=tokens, progress=False)
                out[mode]["interventions"] = {
                    which: {**intervene(model, data, data.questions, generated, cfg, which), "delta": None} for which in ("first", "last")
                }
                for v in out[mode]["interventions"].values():
                    v["delta"] = v["accuracy"] - out[mode]["test"]["accuracy"]
    lat: dict[str, Any] = {}
    stage3 = checkpoint(runs, "stage3")
    for key, data in splits.items():
        lat[key], records, generated, model = evaluate_mode(stage3, data, True, 160, return_latents=key == "test",
                                                            block_end="model")
        lat.setdefault("slots", {})[key], *_ = evaluate_mode(stage3, data, True, 160, block_end="slots")
        if key == "test":
            answers = [([(r.block, r.relevance) for r in g.latents or []], q.fields.get("path", []))
                       for q, g in zip(data.questions, generated)]
            lat["selection"] = selection_on_path(answers, model.backbone.token_grid, demo.synth.grid_size)
            lat["picture_question"] = draw_correct_answer(runs, data, records, generated, model, demo)
    lat["interventions"] = {}
    for kind in ("zero", "noise", "swap"):
        summary, *_ = evaluate_mode(stage3, splits["test"], True, 160, intervention=kind, block_end="model")
        summary["delta"] = summary["accuracy"] - lat["test"]["accuracy"]
        lat["interventions"][kind] = summary
    out["latent"] = lat
    return out


def draw_correct_answer(runs: Path, test, records, generated, model, demo) -> str | None:
    """`latent_block.png`: the first test question the latent model answers correctly (with its thoughts)."""
    from mmlatent.visualize import visualize_answer

    for q, r, g in zip(test.questions, records, generated):
        if r["correct"] and g.latents and any(x.relevance is not None for x in g.latents):
            image = test.images(q)[0]
            visualize_answer(image, g.latents, model.backbone.token_grid, runs / "latent_block.png",
                             title=f"{q.id}: answered {r['prediction']} (right)", path=[tuple(p) for p in q.fields["path"]],
                             cells=demo.synth.grid_size)
            return q.id
    return None


def _rows(result: dict) -> dict[str, dict]:
    """`{row name: {split: summary}}` of one seed's variant: modes, the slots run, and the reference rows."""
    rows = {m: {k: result[m][k] for k in SPLITS} for m in MODES}
    rows["latent, blocks of the trained length"] = result["latent"]["slots"]
    for name in ("majority_colour", "chance"):
        rows[name] = {k: result["reference"][k][name] for k in SPLITS}
    return rows


def _spread(values: list[float | None]) -> dict[str, float | None]:
    """Mean, min and max of the values that exist (a seed without thoughts has no selection score)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None}
    return {"mean": mean(known), "min": min(known), "max": max(known)}


def across_seeds(seeds: dict[int, dict], variants: list[str]) -> dict[str, Any]:
    """Mean and range over seeds of every row's accuracy, overall and per hop, per variant and split."""
    out: dict[str, Any] = {}
    for variant in variants:
        per_seed = [_rows(seeds[s][variant]) for s in seeds]
        table: dict[str, Any] = {}
        for row in per_seed[0]:
            table[row] = {}
            for split in SPLITS:
                hops = per_seed[0][row][split]["per_hop"]
                table[row][split] = {
                    "accuracy": _spread([r[row][split]["accuracy"] for r in per_seed]),
                    "per_hop": {h: _spread([r[row][split]["per_hop"][h]["accuracy"] for r in per_seed]) for h in hops},
                }
        lat = [seeds[s][variant]["latent"] for s in seeds]
        table["latent interventions (delta)"] = {k: _spread([x["interventions"][k]["delta"] for x in lat]) for k in ("zero", "noise", "swap")}
        cot = [seeds[s][variant]["cot"]["interventions"] for s in seeds]
        table["cot word replaced (delta)"] = {k: _spread([x[k]["delta"] for x in cot]) for k in ("first", "last")}
        table["selection"] = {k: _spread([x["selection"][k] for x in lat]) for k in ("selection_on_own_cell", "selection_on_path")}
        out[variant] = {"seeds": sorted(seeds), "rows": table}
    return out


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def print_tables(results: dict) -> None:
    """Each seed's headline table (accuracy per split and hop), its checks, and the summary over seeds."""
    for seed, variants in results["seeds"].items():
        for variant, r in variants.items():
            rows = _rows(r)
            hops_test = sorted(rows["direct"]["test"]["per_hop"], key=int)
            hops_long = sorted(rows["direct"]["longer"]["per_hop"], key=int)
            print(f"\nseed {seed}, {variant.replace('_', ' ')}:")
            head = " ".join(f"{h + ' hop':>7}" for h in hops_test) + " | " + " ".join(f"{h + ' hop':>7}" for h in hops_long)
            print(f"{'row':38} {'test':>6} {'95% interval':>15} {head} | {'longer':>6} {'positions':>9} {'trigger':>7}")
            for name, split in rows.items():
                t, lo = split["test"], split["longer"]
                ci = t.get("accuracy_ci95")
                ci_s = f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
                hop_s = " ".join(f"{_fmt(t['per_hop'][h]['accuracy']):>7}" for h in hops_test) + " | " + \
                    " ".join(f"{_fmt(lo['per_hop'][h]['accuracy']):>7}" for h in hops_long)
                pos = t.get("positions_per_answer")
                trig = t.get("trigger_rate")
                print(f"{name:38} {_fmt(t['accuracy']):>6} {ci_s:>15} {hop_s} | {_fmt(lo['accuracy']):>6} "
                      f"{'' if pos is None else f'{pos:9.1f}'} {'' if trig is None else f'{trig:7.2f}'}")
            lat, cot = r["latent"], r["cot"]["interventions"]
            print("latent interventions: " + ", ".join(f"{k} {_fmt(v['accuracy'])} ({100 * v['delta']:+.1f})" for k, v in lat["interventions"].items()))
            print("CoT word replaced: " + ", ".join(f"{k} {_fmt(v['accuracy'])} ({100 * v['delta']:+.1f}, changed {_fmt(v['changed'])})" for k, v in cot.items()))
            s = lat["selection"]
            print(f"thoughts on their own hop's cell {_fmt(s['selection_on_own_cell'])} (chance {_fmt(s['chance_own_cell'])}), "
                  f"on the walk {_fmt(s['selection_on_path'])} (chance {_fmt(s['chance'])}); minutes {r['minutes']}")
    for variant, summary in results["summary"].items():
        if len(summary["seeds"]) < 2:
            continue
        print(f"\nmean [min, max] over seeds {summary['seeds']}, {variant.replace('_', ' ')}:")
        for name, split in summary["rows"].items():
            if "test" not in split:
                continue
            t, lo = split["test"]["accuracy"], split["longer"]["accuracy"]
            print(f"{name:38} test {_fmt(t['mean'])} [{_fmt(t['min'])}, {_fmt(t['max'])}]   "
                  f"longer {_fmt(lo['mean'])} [{_fmt(lo['min'])}, {_fmt(lo['max'])}]")
