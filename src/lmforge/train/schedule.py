"""Learning-rate schedules as a factor of the peak rate: warmup, then cosine, linear, WSD or constant."""

from __future__ import annotations

import math

from lmforge.config import ScheduleConfig


def lr_factor(step: int, config: ScheduleConfig, *, max_steps: int, peak_lr: float) -> float:
    """Multiplier of the peak learning rate for update `step` (0-based).

    Warmup follows nanoGPT: (step + 1) / (warmup + 1). After warmup the factor decays from 1
    to min_lr / peak_lr by step `decay_steps` (default: max_steps) and stays there.
    """
    floor = config.min_lr / peak_lr
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.name == "constant":
        return 1.0
    end = config.decay_steps or max_steps
    if config.name == "wsd":  # stable at the peak, then a linear decay over the last fraction
        decay_start = max(warmup, end - round(config.wsd_decay_fraction * end))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, end - decay_start))
        return 1.0 - progress * (1.0 - floor)
    progress = min(1.0, (step - warmup) / max(1, end - warmup))
    if config.name == "linear":
        return 1.0 - progress * (1.0 - floor)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)
