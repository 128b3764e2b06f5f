"""Losses: pure functions of tensors. Stages choose which apply and with what weight."""
