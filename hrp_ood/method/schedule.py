"""Epoch schedules of the training losses (SPEC §3.4 warm-up and ramp; co-teaching's forget rate)."""

from __future__ import annotations


def ramp_weight(epoch: float, warmup_epochs: float, ramp_epochs: float) -> float:
    """w(t) of Eq. 15: 0 during warm-up, then linear from 0 to 1 over ``ramp_epochs`` (1 at once if 0)."""
    if epoch < warmup_epochs:
        return 0.0
    if ramp_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - warmup_epochs) / ramp_epochs)


def coteaching_forget_rate(epoch: float, forget_rate: float, ramp_epochs: float = 10) -> float:
    """Co-teaching's R(t) (Han et al. 2018, exponent c = 1): linear from 0 to ``forget_rate`` over ``ramp_epochs``."""
    if ramp_epochs <= 0:
        return forget_rate
    return forget_rate * min(1.0, max(epoch, 0.0) / ramp_epochs)
