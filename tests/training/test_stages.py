"""Stages 2 and 3: the 4D mask, the latent-only alignment gradient, teachers (online and cached), hand-off."""

from __future__ import annotations

import copy

import pytest
import torch

from mmlatent.data.masks import block_attention_mask
from mmlatent.data.pipeline import ShardStream
from mmlatent.data.processor import Processor
from mmlatent.losses.alignment import cosine_alignment
from mmlatent.model.latent_loop import latent_forward
from mmlatent.training.stages import STAGES, Direct, Stage1, Stage2, Stage3, StageConfig, build_stage, latent_only_alignment
from mmlatent.training.teacher import TeacherCache, TeacherConfig, gather_states, target_positions, teacher_states, write_teacher_cache


def batches(model, synth_dir, stage_name: str, n: int = 4, teacher: bool = False, split: str = "train"):
    """Stage-layout batches of `n` real synthetic samples (with the teacher view when asked)."""
    stage = build_stage(StageConfig(name=stage_name, align_weight=0.0))
    slots = model.cfg.latent.slots
    proc = Processor.for_model(model, stage.layout(slots), teacher_layout=stage.teacher_layout(slots) if teacher else None)
    urls = sorted(str(p) for p in (synth_dir / split).glob("*.tar"))
    stream = ShardStream(urls, proc, proc.collate, n,
                         shuffle_buffer=0, loop=False)
    return list(stream)


def test_block_mask_by_hand():
    # one sample of 8 tokens: image at 2..4 visible only to queries 2..5 (its block's start and slot); pad at 7
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]])
    mask = block_attention_mask(attention, [torch.tensor([[2, 4, 6]])])[0, 0]  # (L, L)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    expected = causal.clone()
    expected[:, 7] = False  # nobody attends to padding ...
    expected[6:, 2:4] = False  # ... and from position 6 on, the image is hidden
    expected[7, 7] = True  # the padding row sees itself (no empty softmax row)
    assert torch.equal(mask, expected)


def test_stage2_mask_hides_each_aux_image_from_everything_after_its_block(tiny_model, synth_dir):
    ids = tiny_model.ids
    batch = batches(tiny_model, synth_dir, "stage2")[0]
    B, L = batch.input_ids.shape
    assert batch.block_mask is not None and batch.block_mask.shape == (B, 1, L, L)
    T = tiny_model.tokens_per_image
    checked = 0
    for b in range(len(batch)):
        row, mask = batch.input_ids[b], batch.block_mask[b, 0]
        starts = (row == ids.latent_start).nonzero().flatten().tolist()
        ends = (row == ids.latent_end).nonzero().flatten().tolist()
        question = (row == ids.image).nonzero().flatten()[:T]
        last = int(batch.attention_mask[b].sum()) - 1
        assert mask[last, question].all()  # the question image stays visible to the end
        for s, e in zip(starts, ends):
            img = torch.arange(s - T, s)
            assert (row[img] == ids.image).all()  # the aux image sits right before its block
            assert mask[s:e][:, img].all()  # the block's start and slots see it
            assert not mask[e:, img].any()  # <|latent_end|> and everything after do not
            checked += 1
    assert checked >= len(batch) * 3  # every synthetic sample has at least 3 blocks


def test_latent_forward_honours_the_block_mask(tiny_model, synth_dir):
    """The cached loop with the 4D mask equals a full recompute; and the mask changes the result."""
    from mmlatent.model.latent_loop import reference_latent_forward

    batch = batches(tiny_model, synth_dir, "stage2")[0]
    with torch.no_grad():
        fast = latent_forward(tiny_model, batch.input_ids, batch.block_mask, batch.position_ids, batch.pixel_values)
        ref = reference_latent_forward(tiny_model, batch.input_ids, batch.block_mask, batch.position_ids, batch.pixel_values)
        plain = latent_forward(tiny_model, batch.input_ids, batch.attention_mask, batch.position_ids, batch.pixel_values)
    real = batch.attention_mask.bool()
    assert (fast.logits - ref.logits)[real].abs().max() < 1e-4
    assert (fast.logits - plain.logits)[real].abs().max() > 1e-3


def test_stage2_thoughts_look_only_at_the_prompt_images(synth_dir):
    """Given where the prompt ends, a thought's visual context is the question image alone, as when it is
    generated (no image follows a prompt), not the aux image its block stands beside; the cached loop still
    equals the full recompute."""
    from mmlatent.model.latent_loop import reference_latent_forward
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    cfg = preset("tiny-demo")
    cfg.vision.image_size = 64  # the fixture's images
    torch.manual_seed(0)
    model = LatentVLM(cfg).eval()
    batch = batches(model, synth_dir, "stage2")[0]
    T = model.tokens_per_image
    end = batch.starts + batch.prompt_lengths
    args = (model, batch.input_ids, batch.block_mask, batch.position_ids, batch.pixel_values)
    with torch.no_grad():
        everything = latent_forward(*args)
        prompt = latent_forward(*args, prompt_end=end)
        ref = reference_latent_forward(*args, prompt_end=end)
    assert everything.relevance.shape[-1] > T  # without prompt_end the aux images are in the context too
    assert prompt.relevance.shape[-1] == T and torch.all(prompt.selected < T)
    real = batch.attention_mask.bool()
    assert (prompt.logits - ref.logits)[real].abs().max() < 1e-4
    assert (prompt.logits - everything.logits)[real].abs().max() > 1e-4


def test_alignment_gradient_reaches_weights_only_through_latent_vectors(synth_dir):
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset

    torch.manual_seed(0)
    model = LatentVLM(preset("tiny")).train()
    batch = batches(model, synth_dir, "stage2", n=2)[0]
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = latent_forward(model, batch.input_ids, batch.block_mask, batch.position_ids, batch.pixel_values)
    positions = target_positions(model, batch.input_ids, "observation")
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(s.shape, generator=g) for s in gather_states(
        model.backbone.forward_lm(fwd.inputs_embeds, batch.block_mask, batch.position_ids, output_hidden_states=True).hidden_states,
        positions)]
    align = latent_only_alignment(model, batch, fwd, positions, teacher)
    ours = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)

    # independently: the alignment computed by a frozen copy of the LM, fed the (graph-attached) latent vectors
    frozen = copy.deepcopy(model.backbone).requires_grad_(False)
    x = fwd.inputs_embeds.detach().masked_scatter(fwd.latent_mask[..., None], fwd.latent_vectors)
    out = frozen.forward_lm(x, batch.block_mask, batch.position_ids, output_hidden_states=True)
    via_latents = cosine_alignment(torch.cat(gather_states(out.hidden_states, positions), 1), torch.cat(teacher, 1))
    expected = torch.autograd.grad(via_latents, params, retain_graph=True, allow_unused=True)
    torch.testing.assert_close(align.detach(), via_latents.detach())
    nonzero = 0
    for name_p, a, e in zip([n for n, p in model.named_parameters() if p.requires_grad], ours, expected):
        a = torch.zeros_like(e) if a is None and e is not None else a
        e = torch.zeros_like(a) if e is None and a is not None else e
        if a is None:
            continue
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=name_p)
        nonzero += int(a.abs().sum() > 0)
    assert nonzero > 10  # the latent chain reaches many weights

    # and it is not the naive gradient, which also flows along the direct paths
    full = latent_forward(model, batch.input_ids, batch.block_mask, batch.position_ids, batch.pixel_values, output_hidden_states=True)
    naive = cosine_alignment(torch.cat(gather_states(full.hidden_states, positions), 1), torch.cat(teacher, 1))
    lm_head = dict(model.named_parameters())["backbone.lm.model.norm.weight"]
    (g_naive,) = torch.autograd.grad(naive, [lm_head])
    (g_ours,) = torch.autograd.grad(align, [lm_head], allow_unused=True)
    assert not torch.allclose(g_naive, torch.zeros_like(g_naive) if g_ours is None else g_ours)


def test_teacher_cache_equals_the_online_teacher(tiny_model, synth_dir, tmp_path):
    for stage_name, kind in (("stage2", "observation"), ("stage3", "latent")):
        views = [b.teacher for b in batches(tiny_model, synth_dir, stage_name, n=8, teacher=True, split="val")]
        n, skipped = write_teacher_cache(tiny_model, views, tmp_path / stage_name, kind, dtype=torch.float32)
        assert n == 32 and not skipped
        cache = TeacherCache(tmp_path / stage_name)
        assert cache.kind == kind
        online = teacher_states(tiny_model, views[1], kind)
        cached = cache.states(views[1].keys)
        assert all(torch.equal(a, b) for a, b in zip(online, cached))
        assert all(a.shape[0] == tiny_model.backbone.num_layers and a.shape[1] > 0 for a in online)
        with pytest.raises(KeyError, match="no states for sample key"):
            cache.states(["nope"])


def test_stage_needs_exactly_one_teacher_source():
    with pytest.raises(ValueError, match="stage.teacher"):
        build_stage(StageConfig(name="stage2"))
    assert isinstance(build_stage(StageConfig(name="stage3", align_weight=0.0)), Stage3)


def test_each_stage_name_builds_its_own_class_with_its_weights():
    assert STAGES == {"stage1": Stage1, "direct": Direct, "stage2": Stage2, "stage3": Stage3}
    built = {name: build_stage(StageConfig(name=name, align_weight=0.0)) for name in STAGES}
    assert {n: s.observation_weight for n, s in built.items()} == {"stage1": 2.0, "direct": 1.0, "stage2": 4.0, "stage3": 4.0}
    assert build_stage(StageConfig(name="stage2", teacher=TeacherConfig(cache="x"))).align_weight == 1.0
    assert build_stage(StageConfig(name="stage3", teacher=TeacherConfig(cache="x"))).align_weight == 2.0
    layouts = {n: s.layout(4) for n, s in built.items()}
    assert {n: l.aux_images for n, l in layouts.items()} == {
        "stage1": "inline", "direct": "drop", "stage2": "image_then_latent", "stage3": "latent"}
    assert layouts["direct"].reasoning == "answer_only"
    assert [s.trains_latent_blocks for s in built.values()] == [False, False, True, True]
    with pytest.raises(ValueError, match="stage.name='stage4'"):
        build_stage(StageConfig(name="stage4"))


def test_stage3_latent_only_layout_keeps_blocks_and_conclusion(tiny_model, synth_dir):
    ids = tiny_model.ids
    stage = build_stage(StageConfig(name="stage3", align_weight=0.0, reasoning="latent_only"))
    proc = Processor.for_model(tiny_model, stage.layout(tiny_model.cfg.latent.slots))
    full = batches(tiny_model, synth_dir, "stage3", n=1)[0]
    urls = sorted(str(p) for p in (synth_dir / "train").glob("*.tar"))
    lean = next(iter(ShardStream(urls, proc, proc.collate, 1,
                                 shuffle_buffer=0, loop=False)))
    assert lean.keys == full.keys
    n_blocks = int((full.input_ids == ids.latent_start).sum())
    assert int((lean.input_ids == ids.latent_start).sum()) == n_blocks
    assert not (lean.input_ids == ids.image).sum() > tiny_model.tokens_per_image  # only the question image
    assert not (lean.input_ids == ids.observation_open).any()
    text = tiny_model.tokenizer.decode(lean.input_ids[0, lean.prompt_lengths[0]:])
    assert text.rstrip().endswith(f"The answer is {lean.answers[0]}.<|im_end|>") or f"The answer is {lean.answers[0]}." in text
    assert lean.attention_mask.sum() < full.attention_mask.sum()


def test_stage_hand_off_loads_weights_and_freezes_modules(tmp_path, monkeypatch):
    from mmlatent.training import checkpoint_reader
    from mmlatent.training.module import LatentVLMModule
    from mmlatent.training.optim import ModuleLR, OptimConfig

    monkeypatch.setattr(checkpoint_reader, "INIT_CHUNK_BYTES", 4096)  # many chunks, each released after its copy

    torch.manual_seed(0)
    stage1 = LatentVLMModule()
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(0.01)  # "trained": differs from any fresh init
    ckpt = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, ckpt)

    optim = OptimConfig(lr_scale=[ModuleLR("backbone.vision", 0.0), ModuleLR("backbone.projector", 0.5)])
    torch.manual_seed(1)
    stage2 = LatentVLMModule(stage=StageConfig(name="stage3", align_weight=0.0), optim=optim, init_from=str(ckpt))
    for (name, a), b in zip(stage1.state_dict().items(), stage2.state_dict().values()):
        assert torch.equal(a, b), name
    opt = stage2.configure_optimizers()["optimizer"]
    frozen = {n for n, p in stage2.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.vision") for n in frozen)
    assert {n for n, _ in stage2.model.backbone.vision.named_parameters(prefix="backbone.vision")} == frozen
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert scales == {0.5, 1.0}
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in stage2.model.backbone.vision.parameters())

    # a checkpoint of another architecture is refused, naming the tensor
    from mmlatent.model.presets import preset

    wide = preset("tiny")
    wide.lm.random_init.hidden_size = 64
    with pytest.raises(ValueError, match="init_from .* has shape"):
        LatentVLMModule(vlm=wide, init_from=str(ckpt))


def test_stage1_selection_grounding_asks_before_each_aux_image(synth_dir):
    """With `grounding.selection_weight`, stage 1 asks the selector from the hidden state before each inline
    aux image where it comes from: a selection loss that is the mean -log(mass in the region), whose gradient
    reaches the selector and the LM; the logits are those of the plain forward; off by default."""
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset
    from mmlatent.training.grounding import GroundingConfig
    from mmlatent.training.stages import AnchoredOutput

    cfg = preset("tiny-demo")
    cfg.vision.image_size = 64
    torch.manual_seed(0)
    model = LatentVLM(cfg)
    batch = batches(model, synth_dir, "stage1")[0]
    assert batch.anchors.shape[0] >= len(batch) and batch.anchor_regions.any(-1).all()
    stage = build_stage(StageConfig(name="stage1", grounding=GroundingConfig(selection_weight=0.5)))
    out = stage.forward(model, batch)
    assert isinstance(out, AnchoredOutput) and out.relevance.shape == (batch.anchors.shape[0], model.tokens_per_image)
    with torch.no_grad():
        plain = build_stage(StageConfig(name="stage1")).forward(model, batch)
    assert not isinstance(plain, AnchoredOutput)
    torch.testing.assert_close(out.logits, plain.logits)
    losses = stage.losses(model, batch, out)
    region = batch.anchor_regions[:, : model.tokens_per_image]
    want = 0.5 * -torch.log((out.relevance * region).sum(-1)).mean()
    torch.testing.assert_close(losses["selection_loss"], want)
    losses["selection_loss"].backward()
    for module in (model.lq_former.selector.query, model.lq_former.selector.key):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.lm.parameters())


def test_attention_grounding_trains_where_the_lm_looks_from_each_reading_token(synth_dir):
    """With `grounding.attention_weight`, the direct baseline (anchor: the token before the answer) and the
    text-only CoT (anchors: each `<observation>` token) train the LM's own attention over the prompt's image
    tokens toward the anchor's region: the maps are the chosen layers' attention, heads averaged, renormalised
    over those tokens (checked by hand), the loss their -log mass in the region, its gradient reaches the LM.
    It needs eager attention and is refused by the latent stages."""
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset
    from mmlatent.training.grounding import GroundingConfig
    from mmlatent.training.stages import AnchoredOutput

    cfg = preset("tiny-demo")
    cfg.vision.image_size = 64
    cfg.lm.attn_implementation = "eager"
    torch.manual_seed(0)
    model = LatentVLM(cfg)
    grounding = GroundingConfig(attention_weight=0.5, attention_layers=[-1, 1])
    for name, extra in (("direct", {}), ("stage1", {"aux_dropout": 1.0})):
        stage = build_stage(StageConfig(name=name, grounding=grounding, **extra))
        proc = Processor.for_model(model, stage.layout(model.cfg.latent.slots))
        urls = sorted(str(p) for p in (synth_dir / "train").glob("*.tar"))
        batch = next(iter(ShardStream(urls, proc, proc.collate, 4, shuffle_buffer=0, loop=False)))
        per_sample = 1 if name == "direct" else None
        assert batch.anchors.shape[0] >= len(batch) and (per_sample is None or batch.anchors.shape[0] == len(batch))
        read = batch.input_ids[batch.anchors[:, 0], batch.anchors[:, 1] + (name == "stage1")]  # the word read next
        if name == "stage1":
            assert bool((batch.input_ids[batch.anchors[:, 0], batch.anchors[:, 1]] == model.ids.observation_open).all())
        out = stage.forward(model, batch)
        assert isinstance(out, AnchoredOutput) and out.relevance is None and read.numel()
        with torch.no_grad():
            embeds = model.embed_inputs(batch.input_ids, batch.pixel_values)
            full = model.backbone.forward_lm(embeds, batch.lm_attention_mask, batch.position_ids, output_attentions=True)
        for a, (row, col) in enumerate(batch.anchors.tolist()):
            cols = (batch.input_ids[row] == model.ids.image).nonzero().flatten()[: model.tokens_per_image]
            att = torch.stack([full.attentions[i][row, :, col, cols].mean(0) for i in (-1, 1)]).mean(0)
            torch.testing.assert_close(out.attention[a], att / att.sum())
        losses = stage.losses(model, batch, out)
        region = batch.anchor_regions[:, : model.tokens_per_image]
        torch.testing.assert_close(losses["attention_loss"], 0.5 * -torch.log((out.attention * region).sum(-1)).mean())
        model.zero_grad()
        losses["attention_loss"].backward()
        assert model.backbone.lm.model.layers[-1].self_attn.q_proj.weight.grad.abs().sum() > 0
    sdpa_cfg = preset("tiny-demo")
    sdpa_cfg.lm.attn_implementation = "sdpa"
    sdpa = LatentVLM(sdpa_cfg)
    with pytest.raises(ValueError, match="attn_implementation: eager"):
        grounding.check(sdpa)
    with pytest.raises(ValueError, match="attention_weight"):
        build_stage(StageConfig(name="stage3", align_weight=0.0, grounding=grounding))


def test_direct_path_grounding_reads_each_cell_of_the_walk_at_its_own_layer():
    """`grounding.path_layers`: the token before a direct answer also anchors the regions the walk passes
    before the answer's (its start cell first), the k-th read at `path_layers[k]` alone (checked by hand);
    regions past the list are not anchored, and stage 1 refuses the field."""
    from mmlatent.data.synthetic import SynthConfig, TaskMix, generate_sample
    from mmlatent.model.latent_vlm import LatentVLM
    from mmlatent.model.presets import preset
    from mmlatent.training.grounding import GroundingConfig

    torch.manual_seed(0)
    model = LatentVLM(preset("tiny-demo"))
    grounding = GroundingConfig(attention_weight=1.0, attention_layers=[-1], path_layers=[1])
    stage = build_stage(StageConfig(name="direct", grounding=grounding))
    proc = Processor.for_model(model, stage.layout(model.cfg.latent.slots))
    synth = SynthConfig(image_size=48, grid_size=3, palette=("red", "green", "blue", "yellow"), num_choices=4,
                        task_mix=TaskMix(walk=1.0), hops=(1, 2), moves="colours")
    raws = [generate_sample(synth, 0, "train", i) for i in range(4)]
    batch = proc.collate([proc({"key": r.key, "meta": r.meta, "images": r.images}) for r in raws])
    assert batch.anchor_steps.tolist() == [-1, 0] * 4  # the answer's region, then the start cell; 2 moves: no more
    starts = [proc({"key": r.key, "meta": {**r.meta, "regions": {"answer": r.meta["regions"]["aux0"]}}, "images": r.images})
              for r in raws]
    for i, s in enumerate(starts):  # the step-0 anchor's region is the start cell (aux0's)
        torch.testing.assert_close(batch.anchor_regions[2 * i + 1, : s.anchor_regions.shape[1]], s.anchor_regions[0])
    out = stage.forward(model, batch)
    with torch.no_grad():
        embeds = model.embed_inputs(batch.input_ids, batch.pixel_values)
        full = model.backbone.forward_lm(embeds, batch.lm_attention_mask, batch.position_ids, output_attentions=True)
    for a, ((row, col), step) in enumerate(zip(batch.anchors.tolist(), batch.anchor_steps.tolist())):
        cols = (batch.input_ids[row] == model.ids.image).nonzero().flatten()[: model.tokens_per_image]
        att = full.attentions[1 if step == 0 else -1][row, :, col, cols].mean(0)
        torch.testing.assert_close(out.attention[a], att / att.sum())
    with pytest.raises(ValueError, match="path_layers"):
        build_stage(StageConfig(name="stage1", grounding=grounding))
