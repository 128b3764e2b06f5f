"""The step guard (single process): a NaN/Inf loss skips the optimiser step or stops the run naming the
batch, too many skips in a row stop the run, a filler batch on every rank skips without counting."""

from __future__ import annotations

import logging

import pytest
import torch

from mmlatent.training.fault import FaultConfig, StepGuard

KEYS = ["s0001", "s0002"]
FINITE = torch.tensor(1.5)


def step(guard: StepGuard, loss: torch.Tensor, n: int, filler: bool = False) -> bool:
    """One training step `n`: check its loss, then ask whether to skip its optimiser step."""
    guard.check(loss, KEYS, filler, step=n, epoch=0, batch_idx=n)
    return guard.take(n)


def test_finite_loss_runs_the_optimiser_step():
    """A finite loss never skips and counts nothing."""
    guard = StepGuard(FaultConfig())
    assert [step(guard, FINITE, n) for n in range(3)] == [False] * 3
    assert guard.skipped_steps == 0 and guard.consecutive == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_loss_skips_the_step_and_logs_the_batch(bad: float, caplog):
    """Under `skip` a NaN/Inf loss skips that one optimiser step, counts it, and logs the step, epoch, batch
    and sample keys; the next finite step runs again."""
    guard = StepGuard(FaultConfig(nonfinite_loss="skip"))
    with caplog.at_level(logging.WARNING, logger="mmlatent.training.fault"):
        guard.check(torch.tensor(bad), KEYS, False, step=4, epoch=2, batch_idx=9)
    assert "non-finite loss at step 4 (epoch 2, batch 9)" in caplog.text and "s0001" in caplog.text
    assert guard.take(4) is True
    assert guard.skipped_steps == 1 and guard.consecutive == 1
    assert step(guard, FINITE, 5) is False
    assert guard.skipped_steps == 1 and guard.consecutive == 0


def test_one_nonfinite_element_is_enough():
    """A loss tensor with several elements is bad when any of them is not finite."""
    guard = StepGuard(FaultConfig())
    assert step(guard, torch.tensor([1.0, float("nan"), 2.0]), 0) is True
    assert step(guard, torch.tensor([1.0, 2.0]), 1) is False


def test_stop_raises_naming_the_step_and_the_keys():
    """Under `stop` a NaN loss raises `FloatingPointError` at `check` (before backward), naming where it
    happened, the batch keys, and the setting that would skip instead."""
    guard = StepGuard(FaultConfig(nonfinite_loss="stop"))
    with pytest.raises(FloatingPointError) as info:
        guard.check(torch.tensor(float("nan")), KEYS, False, step=12, epoch=1, batch_idx=3)
    message = str(info.value)
    assert "step 12 (epoch 1, batch 3)" in message and "on 1 rank(s)" in message
    assert "rank 0: ['s0001', 's0002']" in message and "model.fault.nonfinite_loss=skip" in message
    assert step(guard, FINITE, 13) is False  # finite losses pass under `stop` too


def test_too_many_skips_in_a_row_stop_the_run():
    """With max_consecutive_skips=3, two NaN steps in a row are skipped, the third stops the run."""
    guard = StepGuard(FaultConfig(max_consecutive_skips=3))
    nan = torch.tensor(float("nan"))
    assert step(guard, nan, 10) and step(guard, nan, 11)
    with pytest.raises(FloatingPointError, match=r"3 optimiser steps in a row up to step 12 had a non-finite loss"):
        step(guard, nan, 12)


def test_a_finite_step_resets_the_streak():
    """Skips separated by a good step do not add up: only skips in a row count toward the limit."""
    guard = StepGuard(FaultConfig(max_consecutive_skips=2))
    nan = torch.tensor(float("nan"))
    for n in range(0, 12, 2):
        assert step(guard, nan, n) is True
        assert step(guard, FINITE, n + 1) is False
    assert guard.skipped_steps == 6 and guard.consecutive == 0


def test_filler_on_every_rank_skips_without_counting():
    """A filler batch (on the only rank) skips its optimiser step, but it is not a non-finite skip: it is not
    counted and does not bring the run closer to the divergence stop."""
    guard = StepGuard(FaultConfig(max_consecutive_skips=1))
    assert step(guard, torch.tensor(0.0), 0, filler=True) is True
    assert step(guard, torch.tensor(0.0), 1, filler=True) is True
    assert guard.skipped_steps == 0
    assert step(guard, FINITE, 2) is False


def test_one_filler_among_accumulated_micro_batches_does_not_drop_the_step():
    """With gradient accumulation the decision covers every micro-batch of the optimiser step: a filler next
    to real data runs the step; only fillers in every micro-batch skip it; a NaN in any of them skips it."""
    guard = StepGuard(FaultConfig())
    for filler in (True, False, True):
        guard.check(torch.tensor(0.0 if filler else 1.5), KEYS, filler, step=0, epoch=0, batch_idx=0)
    assert guard.take(0) is False
    for _ in range(3):
        guard.check(torch.tensor(0.0), KEYS, True, step=1, epoch=0, batch_idx=0)
    assert guard.take(1) is True and guard.skipped_steps == 0
    guard.check(FINITE, KEYS, False, step=2, epoch=0, batch_idx=0)
    guard.check(torch.tensor(float("nan")), KEYS, False, step=2, epoch=0, batch_idx=1)
    assert guard.take(2) is True and guard.skipped_steps == 1


def test_take_consumes_the_decision():
    """A skip applies to one optimiser step: asking again without a new bad batch does not skip."""
    guard = StepGuard(FaultConfig())
    guard.check(torch.tensor(float("inf")), KEYS, False, step=0, epoch=0, batch_idx=0)
    assert guard.take(0) is True and guard.take(1) is False
    assert guard.skipped_steps == 1


def test_max_consecutive_skips_must_be_positive():
    """A limit below 1 is rejected, naming the setting."""
    with pytest.raises(ValueError, match=r"fault\.max_consecutive_skips=0 must be at least 1"):
        FaultConfig(max_consecutive_skips=0)
    assert FaultConfig().nonfinite_loss == "skip" and FaultConfig().max_consecutive_skips == 20
