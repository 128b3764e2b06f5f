"""`val/observation_acc`: the teacher-forced accuracy of the words inside observation spans, counted by hand.

The stage's forward is replaced by logits written by hand, so the expected value is a count on paper: the
metric must be token-weighted over the whole validation epoch (not a mean of batch means), ignore tokens
outside spans, the tags themselves and unlabelled positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from mmlatent.data.batch import Batch
from mmlatent.tokens import IGNORE_INDEX
from mmlatent.training.metrics import observation_accuracy
from mmlatent.training.module import LatentVLMModule

V = 600  # logits wider than any id used below


def batch_of(rows: list[list[int]], unlabelled: set[tuple[int, int]] = frozenset(), name: str = "k") -> Batch:
    """A batch of token-id rows, every position labelled except `unlabelled` (row, column) pairs."""
    ids = torch.tensor(rows)
    labels = ids.clone()
    for r, c in unlabelled:
        labels[r, c] = IGNORE_INDEX
    B, L = ids.shape
    return Batch(keys=[f"{name}{i}" for i in range(B)], input_ids=ids, attention_mask=torch.ones_like(ids),
                 position_ids=torch.arange(L).expand(B, L), labels=labels, loss_weights=torch.ones(B, L),
                 pixel_values=torch.zeros(0, 3, 1, 1), prompt_lengths=torch.zeros(B, dtype=torch.long),
                 starts=torch.zeros(B, dtype=torch.long), answers=["A"] * B, choices=[["a", "b"]] * B, aux_pixel_values=torch.zeros(0, 3, 1, 1),
                 aux_blocks=torch.zeros(0, dtype=torch.long))


def logits_predicting(batch: Batch, wrong: set[tuple[int, int]]) -> torch.Tensor:
    """(B, L, V) logits whose argmax at position t is token t + 1, except at the `wrong` targets (row, t + 1)."""
    B, L = batch.input_ids.shape
    logits = torch.zeros(B, L, V)
    for r in range(B):
        for t in range(L - 1):
            target = int(batch.input_ids[r, t + 1])
            logits[r, t, target + 1 if (r, t + 1) in wrong else target] = 1.0
    return logits


def test_observation_accuracy_counts_only_labelled_tokens_inside_spans(tiny_model):
    o, c = tiny_model.ids.observation_open, tiny_model.ids.observation_close
    # row 0: two spans, 3 + 1 tokens inside; row 1: one span of 2 tokens, one of them unlabelled
    batch = batch_of([[5, o, 7, 8, 9, c, 6, o, 10, c], [5, 6, o, 11, 12, c, 7, 8, 9, 10]], unlabelled={(1, 4)})
    wrong = {(0, 3), (0, 6), (1, 3), (0, 5)}  # inside (row 0 col 3), outside (col 6), inside (row 1), the tag
    assert observation_accuracy(logits_predicting(batch, wrong), batch.input_ids, batch.labels, o, c) == (3, 5)


def test_val_observation_acc_equals_a_hand_count(tiny_model):
    o, c = tiny_model.ids.observation_open, tiny_model.ids.observation_close
    first = batch_of([[5, o, 7, 8, 9, c, 6, 6], [5, 6, o, 11, 12, c, 7, 8]], name="a")  # 5 observed tokens, 2 wrong
    second = batch_of([[5, o, 7, c, 6, 6, 6, 6]], name="b")  # 1 observed token, right
    third = batch_of([[5, 6, 7, 8, 6, 6, 6, 6]], name="c")  # no span: counts nothing
    wrong = {"a0": {(0, 2), (1, 4)}, "b0": set(), "c0": {(0, 3)}}
    module = LatentVLMModule()
    module.model = tiny_model
    module.stage.forward = lambda model, b: SimpleNamespace(logits=logits_predicting(b, wrong[b.keys[0]]))
    module.stage.losses = lambda model, b, out: {"ce_loss": torch.tensor(0.5)}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader([first, second, third], batch_size=None, collate_fn=lambda b: b)  # one loader, three batches
    trainer.validate(module, dataloaders=loader, verbose=False)
    # by hand: (3 + 1) right of (5 + 1) observed tokens; a mean of batch means would say (3/5 + 1) / 2 = 0.8
    assert trainer.callback_metrics["val/observation_acc"].item() == pytest.approx(4 / 6, abs=1e-7)  # logged as float32
