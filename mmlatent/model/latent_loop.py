"""The training forward over sequences that contain latent blocks, with a KV cache.

Text is teacher-forced; each latent slot's input is computed from the model's own hidden state at the
previous position, so gradients flow through the whole chain of slots. The batch is cut into segments at
every column where *any* sample has a slot: one forward for the prefix up to the first slot column, then
one forward per slot column (a single position, plus the text that follows it up to the next slot column),
and the last segment carries the rest of the sequence. The prefix is never recomputed; the KV cache holds
it. Samples whose blocks sit at different positions or have different lengths share these forwards:
`torch.where` on the inputs replaces the token embedding only in rows that have a slot at that column.
Right padding and explicit position ids keep every column at the same position in every row.

`schedule="jacobi"` (PCCoT) replaces the per-slot forwards by T passes: pass t feeds every slot the
latent computed from pass t-1's hidden states, all slots at once. The prefix is cached once and the cache
is cut back to it after each pass; refinement passes stop at the last slot column (only the states that
feed slots are needed), and the final pass runs the whole suffix.

`min_forwards` cuts text segments into more forwards (exact: the KV cache carries what came before), so
that every rank of a sharded run calls each decoder layer as often as the busiest rank does (FSDP2
gathers a layer's parameters at each call, a collective every rank must join); `planned_forwards` says
how many a batch needs on its own.

`reference_latent_forward` recomputes the full prefix for every slot (what Coconut does); it exists for
parity tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmlatent.model.backbone import LMOutput
from mmlatent.model.latent_vlm import LatentVLM, VisualContext


@dataclass
class LatentForward:
    """Outputs of a forward over sequences with latent blocks."""

    logits: Tensor | None
    """(B, L, V) next-token logits."""
    last_hidden: Tensor
    """(B, L, D) final-layer hidden states."""
    hidden_states: tuple[Tensor, ...] | None
    """num_layers + 1 tensors of (B, L, D), when asked for."""
    latent_mask: Tensor
    """(B, L) True at latent slots."""
    latent_vectors: Tensor
    """(n_slots, D) the inputs fed at the slots, row-major over (sample, position) like `latent_mask`."""
    selected: Tensor | None
    """(n_slots, k) visual tokens each thought selected (thought mode), in the same order."""
    relevance: Tensor | None
    """(n_slots, M) each thought's relevance map over the sample's visual tokens (thought mode)."""
    forwards: int
    """LM forward calls made (the cost the loop is judged by)."""
    inputs_embeds: Tensor | None = None
    """(B, L, D) the LM inputs before the slots were filled (token and image embeddings)."""


def _slot_rows(mask: Tensor, col: int) -> Tensor:
    return mask[:, col].nonzero().flatten()


def _rows_mask(attention_mask: Tensor, a: int, b: int) -> Tensor:
    """The attention mask for inputs at columns [a, b) attending to columns [0, b)."""
    if attention_mask.dim() == 4:  # (B, 1, L, L) explicit mask (stage 2): rows a..b, keys 0..b
        return attention_mask[:, :, a:b, :b]
    return attention_mask[:, :b]  # (B, b) padding mask


def _place(x: Tensor, rows: Tensor, col: int, vectors: Tensor) -> Tensor:
    """Copy of x (B, S, D) with x[rows, col] = vectors, differentiable w.r.t. both."""
    index = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, S)
    index[rows, col] = True
    full = torch.zeros_like(x)
    full[rows, col] = vectors.to(x.dtype)
    return torch.where(index[..., None], full, x)


def _cat_outputs(outs: list[LMOutput], with_hidden: bool) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    last = torch.cat([o.last_hidden for o in outs], dim=1)  # (B, L, D)
    if not with_hidden:
        return last, None
    layers = zip(*[o.hidden_states for o in outs])
    return last, tuple(torch.cat(list(h), dim=1) for h in layers)  # each (B, L, D)


def planned_forwards(model: LatentVLM, input_ids: Tensor, schedule: Literal["sequential", "jacobi"] | None = None) -> int:
    """LM forwards `latent_forward` makes over this batch without `min_forwards`."""
    cols = int((input_ids == model.ids.latent).any(0).sum())
    if not cols:
        return 1
    return 1 + model.cfg.latent.jacobi_iterations if (schedule or model.cfg.latent.schedule) == "jacobi" else 1 + cols


def _split(bounds: list[int], n: int) -> list[int]:
    """Segment boundaries [0, ..., L] with extra cuts (halving the widest segment) until there are `n` segments."""
    bounds = list(bounds)
    while len(bounds) - 1 < n:
        widths = [b - a for a, b in zip(bounds, bounds[1:])]
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] < 2:
            raise ValueError(f"latent loop: {n} LM forwards asked (min_forwards) over a batch of only {bounds[-1]} columns")
        bounds.insert(i + 1, bounds[i] + widths[i] // 2)
    return bounds


def _run_pieces(model, x, attention_mask, position_ids, bounds, cache, with_hidden) -> list[LMOutput]:
    """Forwards over consecutive column ranges of x (B, L', D), whose columns start at bounds[0], on one cache."""
    start = bounds[0]
    return [
        model.backbone.forward_lm(
            x[:, a - start : b - start], _rows_mask(attention_mask, a, b), position_ids[:, a:b], cache=cache,
            output_hidden_states=with_hidden, logits=False,
        )
        for a, b in zip(bounds, bounds[1:])
    ]


def latent_forward(
    model: LatentVLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    pixel_values: Tensor | None,
    output_hidden_states: bool = False,
    schedule: Literal["sequential", "jacobi"] | None = None,
    prompt_end: Tensor | None = None,
    min_forwards: int = 0,
) -> LatentForward:
    """Teacher-forced forward in which every `<|latent|>` slot is fed the model's own latent vector.

    input_ids (B, L) right-padded; attention_mask (B, L) padding mask or (B, 1, L, L) explicit mask;
    position_ids (B, L); pixel_values (N_img, 3, H, W) for the image tokens. prompt_end (B,): the column
    where each sample's prompt ends; the LQ-Former's thoughts then look only at the prompt's images, as
    they must when generating, where no image follows the prompt (training passes it, so a stage-2 thought
    cannot read the aux image it stands beside); None: every image before the slot. min_forwards: make at
    least this many LM forwards (text segments cut into pieces; the result is the same).
    """
    schedule = schedule or model.cfg.latent.schedule
    embeds = model.embed_inputs(input_ids, pixel_values)  # (B, L, D)
    latent_mask = input_ids == model.ids.latent  # (B, L)
    cols = latent_mask.any(0).nonzero().flatten().tolist()
    if cols and cols[0] == 0:
        raise ValueError("a latent slot at position 0 has no previous hidden state")
    visual = model.visual_context(input_ids, embeds, prompt_end) if model.lq_former is not None else None
    if not cols:
        empty = embeds.new_zeros(0, embeds.shape[-1])
        if min_forwards <= 1:
            out = model.backbone.forward_lm(embeds, attention_mask, position_ids, output_hidden_states=output_hidden_states)
            return LatentForward(out.logits, out.last_hidden, out.hidden_states, latent_mask, empty, None, None, 1, embeds)
        bounds = _split([0, embeds.shape[1]], min_forwards)
        outs = _run_pieces(model, embeds, attention_mask, position_ids, bounds, model.backbone.new_cache(), output_hidden_states)
        last, hidden = _cat_outputs(outs, output_hidden_states)
        return LatentForward(model.backbone.lm_head(last), last, hidden, latent_mask, empty, None, None, len(outs), embeds)
    run = _jacobi if schedule == "jacobi" else _sequential
    out = run(model, embeds, attention_mask, position_ids, latent_mask, cols, visual, output_hidden_states, min_forwards)
    out.inputs_embeds = embeds
    return out


def _step(model: LatentVLM, h: Tensor, rows: Tensor, cols: Tensor, visual: VisualContext | None):
    """Latent inputs for slots at (rows, cols) from their previous hidden states h (n, D)."""
    if visual is None:
        return model.latent_step(h)
    tokens, mask = visual.visible(rows, cols)
    return model.latent_step(h, tokens, mask)


def _sequential(model, embeds, attention_mask, position_ids, latent_mask, cols, visual, with_hidden, min_forwards=0) -> LatentForward:
    L = embeds.shape[1]
    cache = model.backbone.new_cache()
    outs: list[LMOutput] = []
    fed: dict[tuple[int, int], tuple] = {}  # (row, col) -> (vector, selected, relevance)
    slot_cols = set(cols)
    bounds = _split([0, *cols, L], min_forwards)  # the prefix, then one segment per slot column (or more)
    for a, b in zip(bounds, bounds[1:]):
        x = embeds[:, a:b]  # (B, b-a, D)
        if a in slot_cols:  # this segment starts at a slot column: feed the slots from the state at a-1
            rows = _slot_rows(latent_mask, a)
            h_prev = outs[-1].last_hidden[rows, -1]  # (n, D)
            step = _step(model, h_prev, rows, torch.full_like(rows, a), visual)
            x = _place(x, rows, 0, step.vector)
            for i, r in enumerate(rows.tolist()):
                thought = step.indices is not None
                fed[(r, a)] = (step.vector[i], step.indices[i] if thought else None, step.relevance[i] if thought else None)
        out = model.backbone.forward_lm(
            x, _rows_mask(attention_mask, a, b), position_ids[:, a:b], cache=cache,
            output_hidden_states=with_hidden, logits=False,
        )
        outs.append(out)
    last, hidden = _cat_outputs(outs, with_hidden)
    order = [fed[(r, c)] for r, c in latent_mask.nonzero().tolist()]  # row-major, like latent_mask
    thought = order[0][1] is not None
    return LatentForward(
        logits=model.backbone.lm_head(last),
        last_hidden=last,
        hidden_states=hidden,
        latent_mask=latent_mask,
        latent_vectors=torch.stack([o[0] for o in order]),  # (n_slots, D)
        selected=torch.stack([o[1] for o in order]) if thought else None,
        relevance=torch.stack([o[2] for o in order]) if thought else None,
        forwards=len(outs),
    )


def _jacobi(model, embeds, attention_mask, position_ids, latent_mask, cols, visual, with_hidden, min_forwards=0) -> LatentForward:
    B, L, D = embeds.shape
    p0, p1 = cols[0], cols[-1]  # first and last slot columns
    cache = model.backbone.new_cache()
    prefix = model.backbone.forward_lm(
        embeds[:, :p0], _rows_mask(attention_mask, 0, p0), position_ids[:, :p0], cache=cache,
        output_hidden_states=with_hidden, logits=False,
    )
    suffix_mask = latent_mask[:, p0:]  # (B, L-p0)
    rows, rel_cols = suffix_mask.nonzero(as_tuple=True)  # slots, row-major
    x = embeds[:, p0:]  # (B, L-p0, D): slots start from the <|latent|> embedding
    iterations = model.cfg.latent.jacobi_iterations
    step = None
    for _ in range(iterations - 1):
        # a refinement pass only needs the states that feed slots: columns p0 .. p1-1
        out = model.backbone.forward_lm(
            x[:, : p1 - p0], _rows_mask(attention_mask, p0, p1), position_ids[:, p0:p1], cache=cache, logits=False
        )
        model.backbone.truncate_cache(cache, p0)
        h = torch.cat([prefix.last_hidden[:, -1:], out.last_hidden], dim=1)  # (B, p1-p0+1, D): state at p-1
        step = _step(model, h[rows, rel_cols], rows, rel_cols + p0, visual)
        full = torch.zeros_like(x)
        full[rows, rel_cols] = step.vector.to(x.dtype)
        x = torch.where(suffix_mask[..., None], full, embeds[:, p0:])
    # the final pass runs the whole suffix with the refined slots (in pieces when more forwards are asked)
    pieces = _split([p0, L], min_forwards - iterations)
    outs = _run_pieces(model, x, attention_mask, position_ids, pieces, cache, with_hidden)
    last, hidden = _cat_outputs([prefix, *outs], with_hidden)
    vectors = x[suffix_mask] if step is not None else embeds[:, p0:][suffix_mask]
    return LatentForward(
        logits=model.backbone.lm_head(last),
        last_hidden=last,
        hidden_states=hidden,
        latent_mask=latent_mask,
        latent_vectors=vectors,
        selected=step.indices if step is not None else None,
        relevance=step.relevance if step is not None else None,
        forwards=iterations + len(outs),
    )


def reference_latent_forward(
    model: LatentVLM, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, pixel_values: Tensor | None,
    prompt_end: Tensor | None = None,
) -> LatentForward:
    """The same computation as the sequential loop by full recompute: every slot re-runs the whole prefix."""
    embeds = model.embed_inputs(input_ids, pixel_values)  # (B, L, D)
    latent_mask = input_ids == model.ids.latent
    visual = model.visual_context(input_ids, embeds, prompt_end) if model.lq_former is not None else None
    x = embeds
    cols = latent_mask.any(0).nonzero().flatten().tolist()
    for c in cols:
        out = model.backbone.forward_lm(x[:, :c], _rows_mask(attention_mask, 0, c), position_ids[:, :c], logits=False)
        rows = _slot_rows(latent_mask, c)
        step = _step(model, out.last_hidden[rows, -1], rows, torch.full_like(rows, c), visual)
        x = _place(x, rows, c, step.vector)
    out = model.backbone.forward_lm(x, attention_mask, position_ids)
    return LatentForward(out.logits, out.last_hidden, None, latent_mask, x[latent_mask], None, None, len(cols) + 1)
