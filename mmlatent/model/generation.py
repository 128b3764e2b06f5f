"""Batched decoding with a KV cache, text and latent modes interleaved per sample.

Prompts of different lengths are left-padded into one batch with explicit position ids, so every sample's
next position sits in the last column and one single-position LM forward per step serves the whole batch;
the prefix is encoded once. Each sample is in text mode or inside a latent block: when it emits
`<|latent_start|>`, its next inputs are latent vectors made from its own last hidden state (sketch head
or LQ-Former), while the other samples keep decoding tokens in the same forward (`torch.where`-style
row selection). Inside a block the LM says at every slot whether the block goes on or ends (its logit of
`<|latent_end|>` against that of `<|latent|>`, the two labels every slot is trained on), and the block ends
there or at the step budget (2 × slots by default), or after exactly `slots` steps with
`latent.block_end: slots`; then `<|latent_end|>` is fed and the model decides, as it was trained to, whether
another block opens or text resumes. With `latent.schedule: jacobi` a block is decoded whole, as
training's Jacobi forward computes it (PCCoT): its `slots` inputs are refined together over
`jacobi_iterations` passes of the LM over the block (the other rows wait, the block's columns masked out for
them), then it closes. Training refines all of a sequence's blocks together, generation one block at a time
(a later block sees the earlier ones' final vectors), so the two agree exactly on a sequence's first block.

Test-time scaling (`trajectories > 1`): each prompt runs M times in the same batch with noise on its latents
(Gaussian noise or dropout on the vectors, or MC dropout: the LQ-Former's dropout active), each trajectory
drawing from its own generator seeded by (`seed`, trajectory), and the answers are decided by majority vote.

Interventions (`latent_intervention`, see `interventions.py`) replace every latent input by zeros, noise of
its norm or another question's latent, to measure whether the answers depend on them. Each `Generated`
says whether its answer entered a latent block (`entered_latent`) and, with `return_latents`, holds the
vectors it fed and, in thought mode, what each thought selected.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mmlatent.model.latent_vlm import LatentVLM

from mmlatent.model.interventions import (
    INTERVENTIONS, Intervention, LatentEdit, NoiseLatents, ReplayLatents, ZeroLatents, swap_donors,
)
from mmlatent.model.mc_dropout import RowDropout


LatentNoise = Literal["none", "gaussian", "dropout", "mc_dropout"]
LATENT_NOISE: tuple[LatentNoise, ...] = ("none", "gaussian", "dropout", "mc_dropout")


@dataclass
class GenerationConfig:
    """Decoding settings."""

    max_new_tokens: int = 96
    """Most generated positions per sample (text tokens and latent steps alike)."""
    do_sample: bool = False
    """Sample from the distribution instead of greedy argmax."""
    temperature: float = 1.0
    """Softmax temperature when sampling."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling (1.0 keeps the full distribution)."""
    seed: int | None = None
    """Seed of sampling (None: torch's global RNG) and of the latent noise, which trajectory m of every
    question draws from a generator seeded by (seed, m) (None: a base seed drawn from torch's global RNG)."""
    latent: bool = True
    """Allow latent blocks. False forbids `<|latent_start|>`, so the model answers in text only."""
    latent_noise: LatentNoise = "none"
    """Test-time noise on the latents, each trajectory its own draws: `gaussian` (added to each vector),
    `dropout` (elements of each vector dropped), `mc_dropout` (MC dropout: the LQ-Former's dropout sites
    active while generating, the LM and vision tower untouched; thought mode only), or `none`."""
    noise_std: float = 0.1
    """Standard deviation of the Gaussian noise, or the drop probability of `dropout` and `mc_dropout`."""
    trajectories: int = 1
    """Test-time scaling: trajectories per question (M); answers are decided by majority vote."""
    latent_intervention: Intervention = "none"
    """Replace every latent input: `zero`, `noise` (Gaussian with the input's norm) or `swap` (the latents
    another question of the batch fed in an untouched run); `none` leaves them (the causal check)."""
    return_latents: bool = False
    """Keep each answer's latent trajectory (`Generated.latents`): the vectors fed and what they selected."""

    def __post_init__(self) -> None:
        if self.latent_intervention not in INTERVENTIONS:
            raise ValueError(f"generation.latent_intervention={self.latent_intervention!r}: expected one of {INTERVENTIONS}")
        if self.latent_noise not in LATENT_NOISE:
            raise ValueError(f"generation.latent_noise={self.latent_noise!r}: expected one of {LATENT_NOISE}")
        if self.latent_noise in ("dropout", "mc_dropout") and not 0.0 < self.noise_std < 1.0:
            raise ValueError(f"generation.noise_std={self.noise_std}: the drop probability of {self.latent_noise} must be in (0, 1)")
        if self.trajectories < 1:
            raise ValueError(f"generation.trajectories={self.trajectories} must be at least 1")


@dataclass
class LatentRecord:
    """One latent step of a generated answer."""

    block: int
    """Which latent block of the answer (0-based)."""
    slot: int
    """Which slot of the block (0-based)."""
    vector: Tensor
    """(D,) the input the LM read at this slot (after any intervention)."""
    selected: Tensor | None
    """(k,) the visual tokens the thought selected, -1 where none (thought mode)."""
    relevance: Tensor | None
    """(M,) the thought's relevance over the prompt's visual tokens (thought mode)."""


@dataclass
class Generated:
    """One sample's continuation."""

    token_ids: list[int]
    """Generated ids; latent steps appear as the `<|latent|>` id."""
    text: str
    """Decoded text (special tokens removed)."""
    positions: int
    """Generated positions: text tokens plus latent steps."""
    latent_steps: int
    """Latent steps among them."""
    votes: dict[str, int] | None = None
    """Test-time scaling: answer -> number of trajectories that gave it."""
    latents: list[LatentRecord] | None = None
    """The latent trajectory in order, when `return_latents` was asked."""

    @property
    def entered_latent(self) -> bool:
        """Whether the answer entered a latent block (fed at least one latent slot): the trigger."""
        return self.latent_steps > 0


def split_prompts(
    input_ids: Tensor, starts: Tensor, prompt_lengths: Tensor, pixel_values: Tensor, image_id: int, tokens_per_image: int
) -> tuple[list[Tensor], Tensor]:
    """Cut each row of a padded (B, L) training batch to its prompt and keep only the prompt images.

    Row b's prompt is `input_ids[b, starts[b] : starts[b] + prompt_lengths[b]]` (collate left-pads rows to
    align their assistant turns and records where each row starts). Returns the B prompt id tensors and the
    (N_prompt_img, 3, H, W) images they reference, in order.
    """
    prompts, keep, first = [], [], 0
    for row, start, n in zip(input_ids, starts.tolist(), prompt_lengths.tolist()):
        prompt = row[start : start + n]
        n_all = int((row == image_id).sum()) // tokens_per_image
        n_prompt = int((prompt == image_id).sum()) // tokens_per_image
        keep.extend(range(first, first + n_prompt))
        first += n_all
        prompts.append(prompt)
    return prompts, pixel_values[keep]


def left_pad(prompts: list[Tensor], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pad prompts; returns ids (B, L), attention mask (B, L) and position ids (B, L)."""
    L = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, L - p.numel():] = p
        mask[i, L - p.numel():] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L)
    return ids, mask, pos


def next_token(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) token ids, greedy or by temperature / top-p sampling."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(cfg.temperature, 1e-5), dim=-1)  # (B, V)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def perturb(v: Tensor, cfg: GenerationConfig, generators: list[torch.Generator] | None) -> Tensor:
    """Latent vectors (n, D) with the configured test-time noise on their vectors, row i drawn from
    `generators[i]` (`mc_dropout` acts inside the LQ-Former instead: vectors unchanged here)."""
    if cfg.latent_noise not in ("gaussian", "dropout"):
        return v
    if generators is None or len(generators) != v.shape[0]:
        raise ValueError(f"latent noise needs one generator per row: {v.shape[0]} rows")
    if cfg.latent_noise == "gaussian":
        noise = torch.stack([torch.randn(v.shape[1:], generator=g, device=v.device) for g in generators])
        return v + cfg.noise_std * noise.to(v.dtype)  # (n, D)
    keep = torch.stack([torch.rand(v.shape[1:], generator=g, device=v.device) for g in generators]) >= cfg.noise_std
    return v * keep / (1 - cfg.noise_std)  # (n, D)


def trajectory_generators(trajectories: list[int], cfg: GenerationConfig, device: torch.device) -> list[torch.Generator] | None:
    """One latent-noise generator per row, seeded by (`cfg.seed`, the row's trajectory number); without a
    seed, the base comes from torch's global RNG. None when there is no latent noise."""
    if cfg.latent_noise == "none":
        return None
    base = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**31, ()))
    return [torch.Generator(device=device).manual_seed(base * 1_000_003 + m) for m in trajectories]


@torch.no_grad()
def generate_from_prompts(
    model: LatentVLM, prompts: list[Tensor], pixel_values: Tensor, cfg: GenerationConfig,
    questions: list[int] | None = None,
) -> list[Generated]:
    """Continue each prompt (1D id tensors) until `<|im_end|>` or `max_new_tokens` positions, applying the
    configured latent intervention (`swap` first runs the batch untouched to record the donors' latents).
    `questions[i]`: the question prompt i asks (its rows are trajectories 0, 1, … of it: they never swap with
    each other, and each draws its own latent noise); None: every prompt its own question."""
    device = prompts[0].device if prompts else torch.device("cpu")
    if cfg.latent_noise == "mc_dropout" and model.lq_former is None:
        raise ValueError("latent_noise='mc_dropout' acts on the LQ-Former's dropout: thought mode only (this model "
                         "is in sketch mode; use latent_noise 'gaussian' or 'dropout')")
    questions = list(range(len(prompts))) if questions is None else questions
    trajectories = [questions[:r].count(q) for r, q in enumerate(questions)]  # row r is trajectory m of its question
    gen = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    edit: LatentEdit | None = None
    if cfg.latent_intervention == "zero":
        edit = ZeroLatents()
    elif cfg.latent_intervention == "noise":
        edit = NoiseLatents(gen)
    elif cfg.latent_intervention == "swap":
        donors = swap_donors(questions)
        untouched = _decode(model, prompts, pixel_values, replace(cfg, latent_intervention="none", return_latents=True),
                            None, gen, trajectories)
        edit = ReplayLatents([{(r.block, r.slot): r.vector for r in g.latents} for g in untouched], donors)
    return _decode(model, prompts, pixel_values, cfg, edit, gen, trajectories)


def _decode(
    model: LatentVLM, prompts: list[Tensor], pixel_values: Tensor, cfg: GenerationConfig,
    edit: LatentEdit | None, gen: torch.Generator | None, trajectories: list[int],
) -> list[Generated]:
    """The batched cached loop; `edit` replaces latent inputs before the LM reads them; `gen` draws sampled
    tokens; row r's latent noise comes from its own generator, seeded by its trajectory number."""
    ids_ = model.ids
    ids, mask, pos = left_pad(prompts, ids_.pad)
    device = ids.device
    noise = trajectory_generators(trajectories, cfg, device)  # (B,) generators, or None
    cache = model.backbone.new_cache()
    embeds = model.embed_inputs(ids, pixel_values)  # (B, L, D)
    visual = model.visual_context(ids, embeds) if model.lq_former is not None else None
    out = model.backbone.forward_lm(embeds, mask, pos, cache=cache, logits=False)
    h_last = out.last_hidden[:, -1]  # (B, D)
    logits = model.backbone.lm_head(h_last)  # (B, V)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    in_latent = ids[:, -1] == ids_.latent_start  # a prompt may open a block itself
    block = in_latent.long() - 1  # (B,) index of each row's current (or last) latent block, -1 before any
    count = torch.zeros(B, dtype=torch.long, device=device)
    new: list[list[int]] = [[] for _ in range(B)]
    records: list[list[LatentRecord]] = [[] for _ in range(B)]
    budget = model.cfg.latent.budget
    model_ends_blocks = model.cfg.latent.block_end == "model"
    jacobi = model.cfg.latent.schedule == "jacobi"
    if jacobi:  # a Jacobi block is decoded whole, with the slot count training refines; then it closes
        budget = model.cfg.latent.slots
    last_pos = pos[:, -1]  # (B,)
    for _ in range(cfg.max_new_tokens):
        starting = in_latent & (count == 0) & ~done  # rows whose last input opened a block
        if jacobi and bool(starting.any()):
            room = torch.tensor([len(t) + budget <= cfg.max_new_tokens for t in new], device=device)
            done = done | (starting & ~room)  # a block that would pass max_new_tokens ends the answer at its start
            starting = starting & room
            if bool(starting.any()):
                h_last, logits, mask, last_pos = _jacobi_block(
                    model, out.cache, starting, h_last, logits, mask, last_pos, visual, block, cfg, edit, noise, records)
                count = torch.where(starting, torch.full_like(count, budget), count)
                for i in starting.nonzero().flatten().tolist():
                    new[i] += [ids_.latent] * budget
        # inside a block the LM was trained to say, at every slot, whether the block goes on (`<|latent|>`) or
        # ends (`<|latent_end|>`, at its last slot): block_end: model takes that binary decision
        wants_end = in_latent & (count >= 1) & model_ends_blocks & (logits[:, ids_.latent_end] > logits[:, ids_.latent])
        logits[:, ids_.latent] = float("-inf")  # slots are fed by the loop inside a block, never chosen as text
        logits[:, ids_.latent_end] = logits[:, ids_.latent_end].masked_fill(~in_latent, float("-inf"))  # no block to close
        if not cfg.latent:
            logits[:, ids_.latent_start] = float("-inf")
        tok = next_token(logits, cfg, gen)  # (B,)
        # a block holds at least one slot; it ends when the model says so (block_end: model) or at the budget
        # (block_end: slots: always there)
        end_block = in_latent & (wants_end | (count >= budget))
        feed_latent = in_latent & ~end_block & ~done
        tok = torch.where(end_block, torch.full_like(tok, ids_.latent_end), tok)
        tok = torch.where(feed_latent, torch.full_like(tok, ids_.latent), tok)
        tok = torch.where(done, torch.full_like(tok, ids_.pad), tok)
        for i in (~done).nonzero().flatten().tolist():
            new[i].append(int(tok[i]))
        done = done | (tok == ids_.turn_end)
        if jacobi:  # a Jacobi block adds `slots` positions in one step: a row stops at max_new_tokens
            done = done | torch.tensor([len(t) >= cfg.max_new_tokens for t in new], device=device)
        if bool(done.all()):
            break
        opens = ~in_latent & (tok == ids_.latent_start)
        block = block + opens.long()
        in_latent = feed_latent | opens
        count = torch.where(feed_latent, count + 1, torch.zeros_like(count))
        last_pos = last_pos + 1
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, L + t)
        x = model.backbone.embed_tokens(tok[:, None])  # (B, 1, D)
        rows = feed_latent.nonzero().flatten()
        if rows.numel():
            x = x.clone()
            x[rows, 0] = _latent_inputs(model, h_last[rows], rows, torch.full_like(rows, mask.shape[1] - 1), visual,
                                        block[rows], (count - 1)[rows], cfg, edit, noise, records).to(x.dtype)
        out = model.backbone.forward_lm(x, mask, last_pos[:, None], cache=out.cache, logits=False)
        h_last = out.last_hidden[:, -1]
        logits = model.backbone.lm_head(h_last)
    results = []
    for t, rec in zip(new, records):
        steps = sum(1 for x in t if x == ids_.latent)  # every one was fed by the loop (the token is never chosen)
        text = model.tokenizer.decode(t, skip_special_tokens=True).strip()
        latents = rec if cfg.return_latents else None
        results.append(Generated(token_ids=t, text=text, positions=len(t), latent_steps=steps, latents=latents))
    return results


def _latent_inputs(model, h, rows, cols, visual, blocks, slots, cfg, edit, noise, records) -> Tensor:
    """The vectors fed at n latent slots: rows (n,) and cache columns (n,) of the slots, h (n, D) the states
    before them, blocks and slots (n,) their numbers. The model's latent step (with MC dropout when asked),
    then the intervention, then test-time noise on the vectors, each row from its own generator (`noise`,
    one per batch row); recorded per row when asked (`records` None: not recorded)."""
    row_noise = None if noise is None else [noise[r] for r in rows.tolist()]
    mc = RowDropout(cfg.noise_std, row_noise) if cfg.latent_noise == "mc_dropout" else None
    if visual is None:
        step = model.latent_step(h, mc=mc)
    else:
        tokens, vmask = visual.visible(rows, cols)
        step = model.latent_step(h, tokens, vmask, mc=mc)
    vectors = step.vector  # (n, D)
    if edit is not None:
        vectors = edit(rows, blocks, slots, vectors)
    vectors = perturb(vectors, cfg, row_noise)
    if cfg.return_latents and records is not None:
        for i, r in enumerate(rows.tolist()):
            records[r].append(LatentRecord(
                block=int(blocks[i]), slot=int(slots[i]), vector=vectors[i].detach().cpu(),
                selected=None if step.indices is None else step.indices[i].cpu(),
                relevance=None if step.relevance is None else step.relevance[i].cpu(),
            ))
    return vectors


def _jacobi_block(model, cache, starting, h_last, logits, mask, last_pos, visual, block, cfg, edit, noise, records):
    """Decode the latent block each row of `starting` (B,) has just opened, as training's Jacobi forward
    (`latent_loop._jacobi`) computes it on the same sequence: the `slots` inputs start as the `<|latent|>`
    embedding; each of `jacobi_iterations - 1` passes runs the LM over the block's first slots - 1 positions
    and feeds every slot the latent made from the state before it (the cache is cut back after each pass);
    a last pass feeds the refined slots and keeps them in the cache. The other rows wait: the block's
    columns are masked out for them and their state is kept. Returns h_last, logits, mask, last_pos."""
    bb, lat = model.backbone, model.cfg.latent
    N, B = lat.slots, h_last.shape[0]
    device = h_last.device
    rows = starting.nonzero().flatten()  # (n,)
    L0 = mask.shape[1]
    mask = torch.cat([mask, starting[:, None].to(mask.dtype).expand(B, N)], dim=1)  # (B, L0 + N)
    pos = last_pos[:, None] + 1 + torch.arange(N, device=device)  # (B, N)
    x = bb.embed_tokens(torch.full((B, N), model.ids.latent, dtype=torch.long, device=device))  # (B, N, D)
    slot_rows = rows.repeat_interleave(N)  # (n·N,) row of each slot, row-major
    slots = torch.arange(N, device=device).repeat(rows.numel())  # (n·N,)
    for t in range(lat.jacobi_iterations - 1):
        h = h_last[:, None]  # (B, 1, D): the state before the first slot (the block's start)
        if N > 1:  # a refinement pass only needs the states that feed slots: the first N - 1 of them
            o = bb.forward_lm(x[:, : N - 1], mask[:, : L0 + N - 1], pos[:, : N - 1], cache=cache, logits=False)
            bb.truncate_cache(cache, L0)
            h = torch.cat([h, o.last_hidden], dim=1)  # (B, N, D): state before slot s at index s
        last = t == lat.jacobi_iterations - 2  # this pass makes the inputs the block keeps: record them
        vectors = _latent_inputs(model, h[rows].flatten(0, 1), slot_rows, L0 + slots, visual, block[slot_rows],
                                 slots, cfg, edit, noise, records if last else None)  # (n·N, D)
        x = x.clone()
        x[rows] = vectors.view(rows.numel(), N, -1).to(x.dtype)
    out = bb.forward_lm(x, mask, pos, cache=cache, logits=False)  # the refined block, kept in the cache
    h_last = torch.where(starting[:, None], out.last_hidden[:, -1], h_last)  # (B, D)
    logits = torch.where(starting[:, None], bb.lm_head(h_last), logits)  # (B, V)
    return h_last, logits, mask, torch.where(starting, last_pos + N, last_pos)


def images_per_prompt(prompts: list[Tensor], image_id: int, tokens_per_image: int) -> list[int]:
    return [int((p == image_id).sum()) // tokens_per_image for p in prompts]


@torch.no_grad()
def generate_voted(
    model: LatentVLM,
    prompts: list[Tensor],
    pixel_values: Tensor,
    cfg: GenerationConfig,
    extract: Callable[[int, str], str | None] = lambda i, text: text,
) -> list[Generated]:
    """Parallel latent test-time scaling: M noisy trajectories per prompt in one batch, majority vote.

    `extract(i, response)` maps prompt i's response to its answer (None when unparsable; such votes are not
    counted). The returned `Generated` is the first trajectory that gave the winning answer (ties: the answer
    given first), with `votes` filled in and `positions` summed over all M trajectories (the compute
    actually spent).
    """
    M = cfg.trajectories
    if M <= 1:
        return generate_from_prompts(model, prompts, pixel_values, cfg)
    counts = images_per_prompt(prompts, model.ids.image, model.tokens_per_image)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    rep_prompts = [p for p in prompts for _ in range(M)]
    rep_pixels = [pixel_values[s : s + n] for s, n in zip(starts, counts) for _ in range(M)]
    pixels = torch.cat(rep_pixels) if rep_pixels else pixel_values
    runs = generate_from_prompts(model, rep_prompts, pixels, cfg, questions=[i for i in range(len(prompts)) for _ in range(M)])
    results = []
    for i in range(len(prompts)):
        group = runs[i * M : (i + 1) * M]
        answers = [extract(i, g.text) for g in group]
        votes = Counter(a for a in answers if a is not None)
        winner = votes.most_common(1)[0][0] if votes else None
        best = next((g for g, a in zip(group, answers) if a == winner), group[0])
        results.append(
            Generated(
                token_ids=best.token_ids, text=best.text, positions=sum(g.positions for g in group),
                latent_steps=sum(g.latent_steps for g in group), votes=dict(votes), latents=best.latents,
            )
        )
    return results


def generate(
    model: LatentVLM, input_ids: Tensor, starts: Tensor, prompt_lengths: Tensor, pixel_values: Tensor,
    cfg: GenerationConfig, extract: Callable[[int, str], str | None] = lambda i, text: text,
) -> list[Generated]:
    """Generate from the prompts of a training-layout batch (each row's start and prompt length known)."""
    prompts, prompt_pixels = split_prompts(
        input_ids, starts, prompt_lengths, pixel_values, model.ids.image, model.tokens_per_image
    )
    return generate_voted(model, prompts, prompt_pixels, cfg, extract)
