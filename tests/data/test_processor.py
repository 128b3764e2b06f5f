"""The processor renders chats into ids, labels, weights and images according to the layout."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmlatent.data.batch import collate
from mmlatent.tokens import IGNORE_INDEX
from mmlatent.data.processor import Processor, ProcessorConfig, SequenceLayout
from mmlatent.data.sample import SampleError
from mmlatent.model.tokenizer import TokenizerConfig, load_tokenizer

T = 4  # tokens per image in these tests


def sample() -> dict:
    meta = {
        "id": "s0",
        "source": "test",
        "answer": "A",
        "choices": ["red", "blue"],
        "messages": [
            {"role": "user", "content": [{"type": "image", "ref": "img0"}, {"type": "text", "text": "Which colour?"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Look at the cell."},
                    {"type": "aux_image", "ref": "aux0"},
                    {"type": "text", "text": "<observation>It is red.</observation> The answer is A."},
                ],
            },
        ],
    }
    images = {"img0": Image.new("RGB", (8, 8), "red"), "aux0": Image.new("RGB", (8, 8), "blue")}
    return {"key": "k0", "meta": meta, "images": images}


def colour_mean(img: Image.Image) -> torch.Tensor:
    """A stand-in transform whose output identifies the image."""
    return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1).expand(3, 2, 2).clone()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TokenizerConfig())


def test_stage1_layout_inline_aux_images_and_observation_weights(tok):
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="inline", observation_weight=2.0))
    out = proc(sample())
    ids = proc.ids
    assert int((out.input_ids == ids.image).sum()) == 2 * T
    assert out.pixel_values.shape == (2, 3, 2, 2)
    assert out.pixel_values[0, 0, 0, 0] == 255 and out.pixel_values[1, 2, 0, 0] == 255  # question, then aux
    labelled = out.labels != IGNORE_INDEX
    # nothing before the assistant turn and no image token is labelled
    assert not labelled[: out.prompt_length].any()
    assert not labelled[out.input_ids == ids.image].any()
    # the assistant text decodes back, and the turn ends with <|im_end|> which is labelled
    text = tok.decode(out.labels[labelled])
    assert "Look at the cell." in text and "The answer is A." in text and text.endswith("<|im_end|>")
    # tokens strictly inside the observation span weigh 2, other labelled tokens 1, the rest 0
    open_at = int((out.input_ids == ids.observation_open).nonzero())
    close_at = int((out.input_ids == ids.observation_close).nonzero())
    assert torch.all(out.loss_weights[open_at + 1 : close_at] == 2.0)
    assert tok.decode(out.input_ids[open_at + 1 : close_at]) == "It is red."
    assert out.loss_weights[open_at] == 1.0 and out.loss_weights[close_at] == 1.0
    assert torch.all(out.loss_weights[~labelled] == 0)
    assert set(out.loss_weights[labelled].unique().tolist()) == {1.0, 2.0}


def test_direct_layout_answers_at_once(tok):
    layout = SequenceLayout(aux_images="drop", reasoning="answer_only", observation_weight=1.0)
    out = Processor(tok, colour_mean, T, layout)(sample())
    assert out.pixel_values.shape[0] == 1  # the question image only
    text = tok.decode(out.labels[out.labels != IGNORE_INDEX])
    assert text == "The answer is A.<|im_end|>"
    prompt = tok.decode(out.input_ids[: out.prompt_length])
    assert prompt.endswith("<|im_start|>assistant\n") and "Which colour?" in prompt


def test_overlong_is_dropped_or_truncated(tok):
    full = Processor(tok, colour_mean, T, SequenceLayout())(sample())
    short = ProcessorConfig(max_length=full.input_ids.numel() - 3)
    with pytest.raises(SampleError) as err:
        Processor(tok, colour_mean, T, SequenceLayout(), short)(sample())
    assert err.value.reason == "too_long"
    cut = Processor(tok, colour_mean, T, SequenceLayout(), ProcessorConfig(max_length=short.max_length, overlong="truncate"))(sample())
    assert cut.input_ids.numel() == short.max_length
    torch.testing.assert_close(cut.input_ids, full.input_ids[: short.max_length])


def test_collate_pads_right_with_positions(tok):
    proc = Processor(tok, colour_mean, T, SequenceLayout())
    a = proc(sample())
    s = sample()
    s["meta"]["messages"][1]["content"][0]["text"] = "Look."
    b = proc(s)
    batch = collate([a, b], pad_id=proc.ids.pad)
    L = batch.input_ids.shape[1]
    assert L % 8 == 0 and L >= max(a.input_ids.numel(), b.input_ids.numel())
    assert batch.attention_mask[1].sum() == b.input_ids.numel()
    assert torch.all(batch.labels[1, b.input_ids.numel():] == IGNORE_INDEX)
    assert torch.all(batch.loss_weights[1, b.input_ids.numel():] == 0)
    assert torch.equal(batch.position_ids[0], torch.arange(L))
    assert batch.pixel_values.shape[0] == 4


def aux_sample(n_aux: int = 2) -> dict:
    content = [{"type": "text", "text": "Step one."}]
    for i in range(n_aux):
        content += [{"type": "aux_image", "ref": f"aux{i}"}, {"type": "text", "text": f"<observation>Seen {i}.</observation>"}]
    content.append({"type": "text", "text": "The answer is A."})
    s = sample()
    s["meta"]["messages"][1]["content"] = content
    s["images"].update({f"aux{i}": Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(n_aux)})
    return s


def test_stage3_layout_replaces_aux_images_with_latent_blocks_and_keeps_targets(tok):
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="latent", latent_slots=3))
    out = proc(aux_sample(2))
    ids = proc.ids
    assert out.pixel_values.shape[0] == 1  # the question image only
    assert int((out.input_ids == ids.latent_start).sum()) == 2 and int((out.input_ids == ids.latent).sum()) == 6
    assert out.aux_pixel_values.shape[0] == 2 and out.aux_blocks.tolist() == [0, 1]
    assert out.aux_pixel_values[1, 0, 0, 0] == 10  # aux1 is the target of block 1
    start = int((out.input_ids == ids.latent_start).nonzero()[0])
    assert out.input_ids[start : start + 5].tolist() == [ids.latent_start, ids.latent, ids.latent, ids.latent, ids.latent_end]
    # the block is followed by the observation it stands for
    assert out.input_ids[start + 5] == ids.observation_open


def test_stage2_layout_keeps_the_image_then_adds_the_block(tok):
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="image_then_latent", latent_slots=2))
    out = proc(aux_sample(1))
    ids = out.input_ids.tolist()
    first_start = ids.index(proc.ids.latent_start)
    assert ids[first_start - T : first_start] == [proc.ids.image] * T  # the aux image right before its block
    assert out.pixel_values.shape[0] == 2 and out.aux_pixel_values.shape[0] == 1


def test_collate_numbers_blocks_across_the_batch(tok):
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="latent"))
    a, b = proc(aux_sample(2)), proc(aux_sample(1))
    batch = collate([a, b], pad_id=proc.ids.pad, latent_start_id=proc.ids.latent_start)
    assert batch.aux_blocks.tolist() == [0, 1, 2] and batch.aux_pixel_values.shape[0] == 3


def test_coconut_curriculum_replaces_first_steps_and_grows_by_epoch(tok):
    layout = SequenceLayout(aux_images="inline", coconut_steps=1, coconut_slots_per_step=2, coconut_growth=1)
    proc = Processor(tok, colour_mean, T, layout)
    s = aux_sample(2)  # text steps: "Step one.", obs 0, obs 1, answer
    out0 = proc(s)
    text0 = tok.decode(out0.input_ids[out0.prompt_length :])
    assert int((out0.input_ids == proc.ids.latent).sum()) == 2 and "Step one." not in text0 and "Seen 0." in text0
    proc.set_epoch(1)  # k = 2: the first two steps (and the aux image between them) become 4 slots
    out1 = proc(s)
    text1 = tok.decode(out1.input_ids[out1.prompt_length :])
    assert int((out1.input_ids == proc.ids.latent).sum()) == 4 and "Seen 0." not in text1 and "Seen 1." in text1
    assert out1.pixel_values.shape[0] == 2  # question image + aux1 (aux0 fell inside the replaced steps)
    proc.set_epoch(10)  # never replaces the final step
    assert "The answer is A." in tok.decode(proc(s).input_ids)


def test_regions_become_token_masks_per_target_and_collate_pads_them(tok):
    """A 2x2 token grid (T = 4): the box of aux1 covers the bottom-right token of the question image only."""
    s = aux_sample(2)
    s["meta"]["regions"] = {"aux1": {"image": "img0", "box": [0.5, 0.5, 1.0, 1.0]},
                            "aux0": {"image": "img0", "box": [0.0, 0.0, 1.0, 0.5]}}
    for layout in (SequenceLayout(aux_images="latent"), SequenceLayout(aux_images="image_then_latent")):
        proc = Processor(tok, colour_mean, T, layout, token_grid=(2, 2))
        out = proc(s)
        n_visual = int((out.input_ids == proc.ids.image).sum())
        assert out.aux_regions.shape == (2, n_visual)
        assert out.aux_regions[0, :4].tolist() == [True, True, False, False]  # top row
        assert out.aux_regions[1, :4].tolist() == [False, False, False, True]  # bottom right
        assert not out.aux_regions[:, 4:].any()  # an aux image shown inline (stage 2) is never a region
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="latent"), token_grid=(2, 2))
    plain = aux_sample(1)  # no regions: an all-False row
    batch = proc.collate([proc(s), proc(plain)])
    assert batch.aux_regions.shape == (3, 4) and batch.aux_regions[2].sum() == 0
    assert batch.aux_regions[1].tolist() == [False, False, False, True]


def test_inline_aux_images_with_regions_get_anchors_at_the_token_before_them(tok):
    """Stage 1 (inline): each aux image with a region gets an anchor, the position of the token right before
    its image tokens, and that region as a mask; collate moves anchors into batch columns (left padding)."""
    s = aux_sample(2)
    s["meta"]["regions"] = {"aux1": {"image": "img0", "box": [0.5, 0.5, 1.0, 1.0]}}  # aux0 has none
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="inline"), token_grid=(2, 2))
    out = proc(s)
    image = (out.input_ids == proc.ids.image).nonzero().flatten().tolist()
    aux1_start = image[2 * T]  # question image, aux0, then aux1
    assert out.anchors.tolist() == [aux1_start - 1] and out.input_ids[aux1_start - 1] != proc.ids.image
    assert out.anchor_regions.shape == (1, 3 * T)
    assert out.anchor_regions[0].tolist() == [False, False, False, True] + [False] * 8
    short = sample()
    short["meta"]["messages"][0]["content"][1]["text"] = "Which colour is it, in this longer question?"
    batch = proc.collate([proc(sample()), out, proc(short)])
    assert batch.anchors.tolist() == [[1, int(batch.starts[1]) + aux1_start - 1]]
    assert batch.input_ids[1, batch.anchors[0, 1] + 1] == proc.ids.image
    assert batch.anchor_regions.shape == (1, 3 * T) and batch.anchor_regions[0, 3]
    for layout in (SequenceLayout(aux_images="latent"), SequenceLayout(aux_images="inline", reasoning="answer_only")):
        assert Processor(tok, colour_mean, T, layout, token_grid=(2, 2))(s).anchors.numel() == 0


def test_dropped_aux_images_anchor_the_observation_that_reads_their_region(tok):
    """Text-only reasoning (aux images dropped): the `<observation>` token after each dropped aux image with a
    region is its anchor; the ids are those of the plain text rendering."""
    s = aux_sample(2)
    s["meta"]["regions"] = {"aux0": {"image": "img0", "box": [0.0, 0.0, 0.5, 0.5]},
                            "aux1": {"image": "img0", "box": [0.5, 0.5, 1.0, 1.0]}}
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="inline", aux_dropout=1.0), token_grid=(2, 2))
    out = proc(s)
    opens = (out.input_ids == proc.ids.observation_open).nonzero().flatten().tolist()
    assert out.anchors.tolist() == opens and len(opens) == 2
    assert out.anchor_regions[:, :T].tolist() == [[True, False, False, False], [False, False, False, True]]
    plain = aux_sample(2)  # the same sample without regions renders the same ids, with no anchor
    assert torch.equal(proc(plain).input_ids, out.input_ids) and proc(plain).anchors.numel() == 0


def test_direct_answer_anchors_the_token_before_the_answer(tok):
    """Answer-only layout: with an `answer` region, the token before the answer letter is the anchor."""
    s = sample()
    s["meta"]["regions"] = {"answer": {"image": "img0", "box": [0.5, 0.0, 1.0, 0.5]}}
    proc = Processor(tok, colour_mean, T, SequenceLayout(aux_images="drop", reasoning="answer_only"), token_grid=(2, 2))
    out = proc(s)
    (anchor,) = out.anchors.tolist()
    assert tok.decode(out.input_ids[out.prompt_length : anchor + 1]) == "The answer is"
    assert tok.decode(out.input_ids[anchor + 1 : anchor + 2]).strip() == "A"
    assert out.anchor_regions[0, :T].tolist() == [False, True, False, False]
    assert torch.equal(proc(sample()).input_ids, out.input_ids)
